"""A from-scratch NumPy MLP: ReLU hidden layers, softmax with categorical cross-entropy.

All parameters live in one flat buffer and all gradients in another
(:class:`fastadam.FlatParameters`); ``backward`` writes the gradient views in
place, so an optimizer step is one call over one buffer.  No hidden layer is
softmax regression, the model of the paper this project reproduces.
"""
import numpy as np

from .._flat import FlatParameters


class MLP:
    """``sizes`` = [inputs, hidden..., classes]; float32; He-initialised weights, zero biases.
    ``numel_multiple`` pads the flat buffers (see FlatParameters)."""

    def __init__(self, sizes, rng, dtype=np.float32, numel_multiple=1):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must be at least [inputs, classes] of positive ints, got {sizes}")
        self.sizes = [int(s) for s in sizes]
        shapes = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        self.flat = FlatParameters(shapes, dtype=dtype, numel_multiple=numel_multiple)
        self.params, self.grads = self.flat.params, self.flat.grads
        for i, fan_in in enumerate(self.sizes[:-1]):
            w = self.params[f"W{i}"]
            w[...] = rng.standard_normal(w.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        self.n_layers = len(self.sizes) - 1
        self._cache = None

    def forward(self, x):
        """Logits for a batch ``x`` (N, inputs); keeps what backward needs."""
        activations = [x]
        h = x
        for i in range(self.n_layers):
            z = h @ self.params[f"W{i}"]
            z += self.params[f"b{i}"]
            if i < self.n_layers - 1:
                np.maximum(z, 0, out=z)  # ReLU, in place
            activations.append(z)
            h = z
        self._cache = activations
        return h

    def loss_and_backward(self, x, y):
        """Mean cross-entropy over the batch and its gradient, written into ``self.grads``.

        Returns (loss, number correct).
        """
        logits = self.forward(x)
        probs, loss = softmax_cross_entropy(logits, y)
        correct = int(np.count_nonzero(logits.argmax(axis=1) == y))
        n = x.shape[0]
        # d loss / d logits = (softmax - onehot) / n
        delta = probs
        delta[np.arange(n), y] -= 1.0
        delta *= np.float32(1.0 / n)
        for i in reversed(range(self.n_layers)):
            h_prev = self._cache[i]
            np.matmul(h_prev.T, delta, out=self.grads[f"W{i}"])
            np.sum(delta, axis=0, out=self.grads[f"b{i}"])
            if i > 0:
                delta = delta @ self.params[f"W{i}"].T
                delta *= self._cache[i] > 0  # ReLU'
        self._cache = None
        return loss, correct

    def evaluate(self, x, y, batch_size=10000):
        """(mean loss, accuracy) over a dataset, without touching the gradients."""
        total_loss, correct = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = self.forward(xb)
            _, loss = softmax_cross_entropy(logits, yb)
            total_loss += loss * xb.shape[0]
            correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
        self._cache = None
        return total_loss / x.shape[0], correct / x.shape[0]


def softmax_cross_entropy(logits, y):
    """Softmax probabilities and the mean cross-entropy, stable for any logits:
    log softmax = z - max(z) - log(sum(exp(z - max(z))))."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    log_probs = shifted[np.arange(len(y)), y] - np.log(sums[:, 0])
    return exp / sums, float(-log_probs.mean(dtype=np.float64))
