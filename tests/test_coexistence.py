"""fastadam beside torch and scikit-learn, which bring OpenMP runtimes of their own:
imported before or after fastadam, neither crashes nor changes the thread counts asked
for, and fastadam's results do not change.  Each case runs in a fresh process."""
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # fresh interpreters that import torch and scikit-learn

PROBE = textwrap.dedent("""
    import json, sys
    order = sys.argv[1].split(",")
    out = {}
    for name in order:
        if name == "fastadam":
            import numpy as np, fastadam
            from fastadam import _kernel
        elif name == "torch":
            import torch
        elif name == "sklearn":
            import sklearn.cluster
            from sklearn.utils._openmp_helpers import _openmp_effective_n_threads
    import numpy as np
    rng = np.random.default_rng(0)
    p = rng.standard_normal(500_000).astype(np.float32)
    g = rng.standard_normal(500_000).astype(np.float32)
    opt = fastadam.Adam([p], num_threads=2)
    for _ in range(3):
        opt.step([g])
    out["fastadam_default_threads"] = _kernel.default_num_threads()
    out["fastadam_checksum"] = float(np.float64(p.astype(np.float64).sum()))
    if "torch" in order:
        torch.set_num_threads(1); torch.set_num_threads(2)
        out["torch_threads"] = torch.get_num_threads()
        x = torch.randn(300, 300); (x @ x).sum().item()
    if "sklearn" in order:
        out["sklearn_threads"] = _openmp_effective_n_threads()
        sklearn.cluster.KMeans(3, n_init=1, random_state=0).fit(rng.standard_normal((2000, 5)))
    opt.step([g])  # once more after the others ran their parallel code
    out["fastadam_after"] = float(np.float64(p.astype(np.float64).sum()))
    print(json.dumps(out))
""")


def probe(order):
    run = subprocess.run([sys.executable, "-c", PROBE, ",".join(order)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"{order}: {run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("other", ["torch", "sklearn"])
def test_imported_before_or_after(other):
    pytest.importorskip("fastadam._kernel")
    pytest.importorskip(other)
    alone = probe(["fastadam"])
    before = probe([other, "fastadam"])
    after = probe(["fastadam", other])
    for result in (before, after):
        assert result["fastadam_default_threads"] == alone["fastadam_default_threads"]
        assert result["fastadam_checksum"] == alone["fastadam_checksum"]
        assert result["fastadam_after"] == probe(["fastadam"])["fastadam_after"]
    key = f"{other}_threads"
    assert before[key] == after[key]
    reference = subprocess.run(
        [sys.executable, "-c", "import torch; torch.set_num_threads(2); print(torch.get_num_threads())"
         if other == "torch" else
         "from sklearn.utils._openmp_helpers import _openmp_effective_n_threads as n; print(n())"],
        capture_output=True, text=True, timeout=300)
    assert before[key] == int(reference.stdout.strip())
