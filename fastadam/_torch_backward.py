"""fastadam.torch's step in backward (``step_in_backward=True``): a parameter is updated
as soon as autograd has accumulated its gradient, and that gradient is released then,
while it is still in cache, instead of being kept until ``step()`` reads it back.

Parameters are grouped, in their order across ``param_groups``, into buckets of at least
``BUCKET_NUMEL`` elements (a tensor that large is a bucket of its own), because one call
per small tensor would cost more than its update.  A bucket is stepped when every one of
its parameters has its gradient, in one call of the kernel, by a private ordinary-mode
optimizer over those parameters that shares the optimizer's state (so ``state_dict`` is
the optimizer's) and takes its groups' hyperparameters as they are at that moment.  What
is left when the backward pass ends (a bucket with a parameter that got no gradient) is
stepped then.  Each tensor's update is the ordinary step's, bit for bit: the same rule,
step count and scalars, and stochastic rounding that draws with the tensor's place among
all the parameters (fastadam.torch does so in both modes).

torch is not imported here; fastadam.torch hands in what is needed.
"""
import weakref

BUCKET_NUMEL = 1 << 16

ACCUMULATION = (
    "step_in_backward=True updates the parameters during each backward pass, so a second "
    "backward pass before optimizer.step() would be a second step, not an accumulated gradient; "
    "call optimizer.step() after each backward (it has nothing left to do), or accumulate "
    "gradients with the ordinary mode (step_in_backward=False)")


class _Bucket:
    """Parameters stepped together: (group index, parameter) in order."""

    def __init__(self, members):
        self.members = members
        self.ready = 0          # of them, with their gradient in the backward under way
        self.optimizer = None   # the private optimizer, made at the bucket's first step
        self.groups = []        # (its group dict, the index of the group it copies)


class InBackward:
    """The buckets of optimizer ``opt`` and its hooks; ``make`` builds an ordinary-mode
    optimizer of opt's class and options over given groups; ``queue_callback`` is
    autograd's (runs a function when the backward pass under way ends)."""

    def __init__(self, opt, make, tracked_state, queue_callback):
        self.opt, self.make, self.tracked_state = opt, make, tracked_state
        self.queue_callback = queue_callback
        self.handles = []
        self.build()

    def build(self):
        """Buckets and a hook per parameter, anew (after a group is added or state loaded)."""
        self.remove()
        opt = self.opt
        if type(opt.state) is not self.tracked_state:  # shared with the buckets' optimizers
            opt.state = self.tracked_state(dict, opt.state)
        members = [(i, p) for i, group in enumerate(opt.param_groups) for p in group["params"]]
        self.places = {id(p): n for n, (_, p) in enumerate(members)}
        self.buckets, current, numel = [], [], 0
        for i, p in members:
            current.append((i, p))
            numel += p.numel()
            if numel >= BUCKET_NUMEL:
                self.buckets.append(_Bucket(current))
                current, numel = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {id(p): b for b in self.buckets for _, p in b.members}
        # The hooks hold the optimizer weakly: a model outlives its optimizers, and one
        # dropped must not stay alive (with its state) through its hooks, nor step.
        hook = _weak_hook(weakref.ref(self))
        self.handles = [p.register_post_accumulate_grad_hook(hook)
                        for _, p in members if p.requires_grad]
        weakref.finalize(self, _remove, self.handles)
        self.pending = []        # buckets with a ready parameter in the backward under way
        self.unacknowledged = False  # a backward pass stepped since the last step()

    def remove(self):
        _remove(self.handles)
        self.handles = []

    def ready(self, p):
        """Autograd's hook: p's gradient for this backward pass is accumulated."""
        bucket = self.bucket_of[id(p)]
        if not self.pending:  # the first gradient of this backward pass
            if self.unacknowledged:
                p.grad = None  # as it was: the last backward released it (the pass stops here)
                raise RuntimeError(ACCUMULATION)
            self.queue_callback(self.finish)
        if bucket.ready == 0:
            self.pending.append(bucket)
        bucket.ready += 1
        if bucket.ready == len(bucket.members):
            try:
                self.step_bucket(bucket)
            except BaseException:  # the backward pass ends here: its end's callback may not run
                self.forget_pending()
                raise

    def forget_pending(self):
        for bucket in self.pending:
            bucket.ready = 0
        self.pending = []

    def finish(self):
        """The backward pass has ended: step what is left of its buckets."""
        try:
            for bucket in self.pending:
                if bucket.ready:
                    self.step_bucket(bucket)
        finally:
            self.forget_pending()

    def step_bucket(self, bucket):
        opt = self.opt
        with opt._lock:
            if bucket.optimizer is None or bucket.optimizer.state is not opt.state:
                self.new_optimizer(bucket)
            for group, i in bucket.groups:  # this moment's hyperparameters (a schedule's)
                for key, value in opt.param_groups[i].items():
                    if key != "params":
                        group[key] = value
        bucket.optimizer.step()
        for _, p in bucket.members:
            p.grad = None
        bucket.ready = 0
        self.unacknowledged = True

    def new_optimizer(self, bucket):
        by_group = {}
        for i, p in bucket.members:
            by_group.setdefault(i, []).append(p)
        groups = [dict({k: v for k, v in self.opt.param_groups[i].items() if k != "params"},
                       params=params) for i, params in by_group.items()]
        sub = self.make(groups)
        sub.state = self.opt.state
        sub._places = self.places
        bucket.groups = list(zip(sub.param_groups, by_group))
        bucket.optimizer = sub

    def acknowledge(self):
        """``step()`` was called: the next backward pass is the next step."""
        self.unacknowledged = False


def _weak_hook(ref):
    def hook(p):
        in_backward = ref()
        if in_backward is not None:
            in_backward.ready(p)
    return hook


def _remove(handles):
    for handle in handles:
        handle.remove()
