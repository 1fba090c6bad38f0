"""Per-call cost of jax.pure_callback against jax.experimental.buffer_callback around roi_cupy's
RoI Align (NumPy backend), eagerly and under jit, in one run, with the bare NumPy op as the floor.

Run: python benchmarks/jax_callbacks.py (jax installed; about 30 s on 2 cores). Its numbers are
the ones roi_cupy/jax.py quotes for choosing buffer_callback on the CPU platform.
"""
import functools, statistics, timeit
import numpy as np, jax, jax.numpy as jnp
from jax.experimental.buffer_callback import buffer_callback
import roi_cupy
from roi_cupy import ops
import roi_cupy.jax as rj

def make(n, c, h, w, k, size, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, c, h, w)).astype(np.float32)
    lo = rng.uniform(0, 0.6, (k, 2)) * [w, h]
    hi = lo + rng.uniform(0.1, 0.4, (k, 2)) * [w, h]
    b = np.concatenate([rng.integers(0, n, (k, 1)), lo, hi], 1).astype(np.float32)
    return x, b, size

def numpy_op(x, b, size):
    return ops.roi_align(x, b, size, 1.0, 2, True, validate=False)

# One callable per output size, reused: a new closure per call would make JAX compile every
# eager call (its cache of eager executables is keyed on the callback's identity/equality).
@functools.cache
def pure_host(size):
    return lambda x, b: numpy_op(np.asarray(x), np.asarray(b), size)

@functools.cache
def buffer_host(size):
    def host(ctx, out, x, b):
        np.asarray(out)[...] = numpy_op(np.asarray(x), np.asarray(b), size)
    return host

def via_pure(x, b, size):
    shape = jax.ShapeDtypeStruct((b.shape[0], x.shape[1], size, size), x.dtype)
    return jax.pure_callback(pure_host(size), shape, x, b, vmap_method="expand_dims")

def via_buffer(x, b, size):
    shape = jax.ShapeDtypeStruct((b.shape[0], x.shape[1], size, size), x.dtype)
    return buffer_callback(buffer_host(size), shape, vmap_method="expand_dims")(x, b)

def median_us(fn, number):
    times = timeit.repeat(fn, number=number, repeat=15)
    q = statistics.quantiles([t / number * 1e6 for t in times], n=4)
    return q[1], q[0], q[2]

for name, wl in [("small  [1, 4, 16, 16], 4 boxes, 2x2", make(1, 4, 16, 16, 4, 2)),
                 ("medium [2, 64, 32, 32], 64 boxes, 7x7", make(2, 64, 32, 32, 64, 7)),
                 ("large  [2, 256, 64, 64], 256 boxes, 7x7", make(2, 256, 64, 64, 256, 7))]:
    x, b, size = wl
    xj, bj = jnp.asarray(x), jnp.asarray(b)
    number = {"small": 200, "medium": 20, "large": 2}[name.split()[0]]
    ref = numpy_op(x, b, size)
    rows = {"numpy op (floor)": lambda: numpy_op(x, b, size)}
    for label, via in [("pure_callback", via_pure), ("buffer_callback", via_buffer)]:
        jitted = jax.jit(functools.partial(via, size=size))
        assert np.array_equal(np.asarray(via(xj, bj, size)), ref)
        assert np.array_equal(np.asarray(jitted(xj, bj)), ref)
        rows[f"{label} eager"] = lambda via=via: via(xj, bj, size).block_until_ready()
        rows[f"{label} jit"] = lambda j=jitted: j(xj, bj).block_until_ready()
    adapter = jax.jit(lambda x, b: rj.roi_align(x, b, size, 1.0, 2, True))
    rows["roi_cupy.jax eager, validate=True"] = lambda: rj.roi_align(xj, bj, size, 1.0, 2, True).block_until_ready()
    rows["roi_cupy.jax eager, validate=False"] = lambda: rj.roi_align(xj, bj, size, 1.0, 2, True, validate=False).block_until_ready()
    rows["roi_cupy.jax jit"] = lambda: adapter(xj, bj).block_until_ready()
    print(name)
    for label, fn in rows.items():
        fn()
        med, q1, q3 = median_us(fn, number)
        print(f"  {label:38s} median {med:9.1f} us  (IQR {q1:.1f}-{q3:.1f})")
