"""fastadam.jax.adamw and optax.adamw in float32 (jax_enable_x64 off, as by default) against the
float64 result (fastadam.AdamW on float64 NumPy arrays, which follows optax's rule in float64
to 1e-10: tests/test_jax.py): 100 steps, lr 1e-2, weight decay 0.1, two tensors (5000 and 3x7).

    python benchmarks/jax_vs_optax_float32.py
"""
import numpy as np, jax, jax.numpy as jnp, optax, fastadam, fastadam.jax as fj
rng=np.random.default_rng(0)
p={"a":rng.standard_normal(5000),"b":rng.standard_normal((3,7))}
gs=[{k:rng.standard_normal(v.shape) for k,v in p.items()} for _ in range(5)]
truth=[p["a"].copy(), p["b"].copy()]
opt=fastadam.AdamW(truth, lr=1e-2, weight_decay=0.1)
for i in range(100): opt.step([gs[i%5]["a"], gs[i%5]["b"]])
def run(tx):
    pa={k:jnp.asarray(v,jnp.float32) for k,v in p.items()}; s=tx.init(pa)
    for i in range(100):
        g={k:jnp.asarray(v,jnp.float32) for k,v in gs[i%5].items()}
        u,s=tx.update(g,s,pa); pa=optax.apply_updates(pa,u)
    return pa
for name, tx in [("fastadam.jax.adamw",fj.adamw(1e-2,weight_decay=0.1)),("optax.adamw",optax.adamw(1e-2,weight_decay=0.1))]:
    r=run(tx); print(name, max(float(np.max(np.abs(np.asarray(r[k],np.float64)-t))/np.max(np.abs(t))) for k,t in zip("ab",truth)))
