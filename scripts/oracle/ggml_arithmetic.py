"""What llama.cpp computes, op by op, bit for bit: the specification the engine's int8 path
implements (`engine/src/model/ggml.rs` and the block-dot kernels).

Q8 activation rounding makes this model chaotic: llama.cpp against itself, prompt in one batch
against one token at a time, differs by 0.042 in log-prob (top-1 0.976), only because two
attention dot products sum in another order. So an engine gives llama.cpp's numbers only by
doing ggml's arithmetic exactly (`engine/tests/reference.rs` then finds every top-1 token and
every greedy answer the same). This script pins what that arithmetic is.

It runs llama.cpp (llama-cpp-python) on the first tokens of a fixture text with an eval callback
(`cb_eval`) that copies every f32 tensor the graph computes, once with the prompt as one batch
and once a token at a time, and recomputes each op in numpy from the op's own llama.cpp inputs
with a candidate arithmetic. Each line it prints is an op and the share of elements that are
bit-identical (1.0000 = exact). All of them are exact with the arithmetic written here; the
`control` lines use a plausible other order and are not, which shows the check can fail.

The arithmetic is that of the llama.cpp build `scripts/oracle/env.sh` makes on an AVX-512 x86
CPU (this machine): its reductions are 16 lanes wide. A build for AVX2 only sums in 8 lanes and
computes other bits; llama.cpp's numbers are a property of its build, not of the model file.

    ORACLE_PY=/path/to/python scripts/oracle/ggml_arithmetic.py   # needs scripts/oracle/requirements.txt
"""
import ctypes
import json

import gguf
import llama_cpp
import numpy as np

from common import FIXTURES, MODEL

F32 = np.float32
TOKENS = 12  # first tokens of fixture text 0: enough for every op, quick to check in numpy


# --- llama.cpp tensors through the eval callback -------------------------------------------

class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` of ggml 0.25 (llama-cpp-python 0.3.36)."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int),
                ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                ("padding", ctypes.c_char * 8)]


def trace(ids, n_batch):
    """Every contiguous f32 tensor of every graph llama.cpp evaluates for `ids`, as
    `graphs[g][name]` (a name seen twice in a graph gets `#1`, `#2`...), ggml's dims reversed."""
    graphs = []

    def callback(t, ask, _user):
        if ask:
            return True
        t = ctypes.cast(t, ctypes.POINTER(GgmlTensor)).contents
        name = t.name.decode()
        if name == "embd":
            graphs.append({})
        ne, nb = list(t.ne), list(t.nb)
        if t.type == 0 and t.data and nb[0] == 4 and nb[1] == 4 * ne[0]:
            n = ne[0] * ne[1] * ne[2] * ne[3]
            ptr = ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float))
            a = np.ctypeslib.as_array(ptr, shape=(n,)).copy().reshape(ne[::-1])
            key, i = name, 0
            while key in graphs[-1]:
                i += 1
                key = f"{name}#{i}"
            graphs[-1][key] = a
        return True

    cb = llama_cpp.ggml_backend_sched_eval_callback(callback)
    default_params = llama_cpp.llama_context_default_params

    def with_callback():
        p = default_params()
        p.cb_eval = cb
        return p

    llama_cpp.llama_context_default_params = with_callback
    llama_cpp.llama.llama_cpp.llama_context_default_params = with_callback
    try:
        llm = llama_cpp.Llama(str(MODEL), n_ctx=256, n_threads=2, n_threads_batch=2,
                              n_batch=n_batch, n_ubatch=n_batch, logits_all=True, verbose=False)
        llm.eval(ids)
    finally:
        llama_cpp.llama_context_default_params = default_params
        llama_cpp.llama.llama_cpp.llama_context_default_params = default_params
    return graphs


# --- the arithmetic ---------------------------------------------------------------------------

def fma(a, b, c):
    """One rounding of a·b + c (the f32 product is exact in f64)."""
    a, b, c = np.broadcast_arrays(*(np.asarray(v, F32) for v in (a, b, c)))
    return (a.astype(np.float64) * b + c.astype(np.float64)).astype(F32)


def f16(x):
    return np.asarray(x, F32).astype(np.float16).astype(F32)


def reduce16(v):
    """GCC's `_mm512_reduce_add_ps`: halves added 256, 128, then [2,3]+[0,1], then 0+1."""
    t = v[..., 8:] + v[..., :8]
    t = t[..., 4:] + t[..., :4]
    return (t[..., 2] + t[..., 0]) + (t[..., 3] + t[..., 1])


def hsum8(v):
    """ggml's `hsum_float_8`."""
    t = v[..., 4:] + v[..., :4]
    return (t[..., 0] + t[..., 2]) + (t[..., 1] + t[..., 3])


def rms_norm(x, eps):
    """x·(1/sqrt(mean + eps)) with the sum of squares (each square an f32) in f64, in order."""
    out = np.empty_like(x)
    for i, row in enumerate(x):
        s = 0.0
        for v in (row * row).astype(F32):
            s += float(v)
        out[i] = row * (F32(1) / np.sqrt(F32(s / len(row)) + F32(eps)))
    return out


def quantize_q8(x, with_sum):
    """ggml's AVX2 `quantize_row_q8_0/1`: d = max|x|/127 (stored f16), q = round-half-even of
    x·(127/max|x|), and for Q8_1 s = f16(d·Σq) with d before its f16 rounding."""
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)
    d = (amax / F32(127)).astype(F32)
    inv = np.where(amax != 0, F32(127) / np.where(amax != 0, amax, 1), 0).astype(F32)
    q = np.rint((xb * inv[:, None]).astype(F32)).astype(np.int32)
    s = f16((d * q.sum(axis=1).astype(F32)).astype(F32)) if with_sum else None
    return f16(d), s, q


def quant_rows(reader, name):
    """A Q4_1 or Q8_0 weight as per-block scales, mins (Q4_1) and integer quants."""
    t = next(t for t in reader.tensors if t.name == name)
    raw = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[-1]), -1)
    if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
        b = raw.reshape(raw.shape[0], -1, 20)
        qs = b[:, :, 4:]
        q = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int32)
        return (b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32),
                b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(F32), q)
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.tensor_type
    b = raw.reshape(raw.shape[0], -1, 34)
    return (b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(F32), None,
            b[:, :, 2:].view(np.int8).astype(np.int32))


def quant_matmul(weight, x):
    """`ggml_vec_dot_q4_1_q8_1` / `q8_0_q8_0` (AVX2), for every token row of `x`: per block,
    eight i32 lanes of four products each, `acc = fma(d_w·d_a, lanes, acc)` in one accumulator,
    then `hsum_float_8(acc)`, plus (Q4_1) the running f32 sum of m_w·s_a."""
    d, m, q = weight
    out = np.zeros((x.shape[0], d.shape[0]), F32)
    for i, row in enumerate(x):
        da, sa, qa = quantize_q8(row, m is not None)
        lanes = (q * qa[None]).reshape(d.shape[0], d.shape[1], 8, 4).sum(-1).astype(F32)
        acc = np.zeros((d.shape[0], 8), F32)
        mins = np.zeros(d.shape[0], F32)
        for b in range(d.shape[1]):
            if m is not None:
                mins = (mins + (m[:, b] * sa[b]).astype(F32)).astype(F32)
            acc = fma((d[:, b] * da[b]).astype(F32)[:, None], lanes[:, b], acc)
        out[i] = hsum8(acc) + mins
    return out


def rope(x, theta_base, dims):
    """ggml's rope cache (θ = pos, then θ *= base^(-2/dims) per pair, all f32; cosf/sinf) and
    the rotation of adjacent pairs as fma(x0, cos, -(x1·sin)), fma(x0, sin, x1·cos)."""
    libm = ctypes.CDLL("libm.so.6")
    for f in ("cosf", "sinf", "powf"):
        getattr(libm, f).restype = ctypes.c_float
    libm.cosf.argtypes = libm.sinf.argtypes = [ctypes.c_float]
    libm.powf.argtypes = [ctypes.c_float, ctypes.c_float]
    scale = F32(libm.powf(F32(theta_base), F32(-2.0) / F32(dims)))
    out = np.empty_like(x)
    for p in range(x.shape[0]):
        theta, cs = F32(p), []
        for _ in range(dims // 2):
            cs.append((libm.cosf(theta), libm.sinf(theta)))
            theta = F32(theta * scale)
        cos, sin = np.array(cs, F32).T
        x0, x1 = x[p, :, 0::2], x[p, :, 1::2]
        out[p, :, 0::2] = fma(x0, cos, -(x1 * sin).astype(F32))
        out[p, :, 1::2] = fma(x0, sin, (x1 * cos).astype(F32))
    return out


def padded(a, multiple):
    pad = (-a.shape[-1]) % multiple
    return np.concatenate([a, np.zeros(a.shape[:-1] + (pad,), F32)], axis=-1)


def dot_tinyblas(a, b):
    """llamafile's tinyBLAS for f16 on AVX-512 (a mat-mul with two or more rows): one 16-lane
    accumulator, fma over the length 16 at a time, then `reduce16`. Zero padding adds nothing."""
    a, b = padded(a, 16), padded(b, 16)
    acc = np.zeros(np.broadcast_shapes(a.shape, b.shape)[:-1] + (16,), F32)
    for k in range(0, a.shape[-1], 16):
        acc = fma(a[..., k:k + 16], b[..., k:k + 16], acc)
    return reduce16(acc)


def dot_vec_f16(a, b):
    """`ggml_vec_dot_f16` on AVX-512 (a single row): four 16-lane accumulators over steps of 64,
    then (0+2) + (1+3) and `reduce16`."""
    a, b = padded(a, 64), padded(b, 64)
    shape = np.broadcast_shapes(a.shape, b.shape)[:-1] + (16,)
    acc = [np.zeros(shape, F32) for _ in range(4)]
    for k in range(0, a.shape[-1], 64):
        for j in range(4):
            acc[j] = fma(a[..., k + 16 * j:k + 16 * j + 16], b[..., k + 16 * j:k + 16 * j + 16],
                         acc[j])
    return reduce16((acc[0] + acc[2]) + (acc[1] + acc[3]))


EXP_C = [F32(float.fromhex(h)) for h in (
    "0x1.8p23", "0x1.715476p+0", "0x1.62e4p-1", "0x1.7f7d1cp-20",
    "0x1.0e4020p-7", "0x1.573e2ep-5", "0x1.555e66p-3", "0x1.fffdb6p-2", "0x1.ffffecp-1")]


def v_expf(x):
    """ggml's AVX-512 `ggml_v_expf` for finite inputs: n = round(x·log2 e), b = x - n·ln 2 in
    two fnmadds, a degree-5 polynomial j(b) with the 1 inside, result j·2^n (scalef)."""
    r, l2e, hi, lo, c5, c4, c3, c2, c1 = EXP_C
    x = np.asarray(x, F32)
    n = (fma(x, l2e, r) - r).astype(F32)
    b = fma(-n, lo, fma(-n, hi, x))
    u = (b * b).astype(F32)
    j = fma(fma(fma(c5, b, c4), u, fma(c3, b, c2)), u, fma(c1, b, F32(1)))
    return (j * np.ldexp(np.ones_like(x), n.astype(np.int32)).astype(F32)).astype(F32)


def soft_max(kq, scale):
    """Causal rows of `kq` [heads, tokens, kv]: w = kq·scale, e = v_expf(w - max), the f64 sum
    of `reduce16` of each 16 values, then e·f32(1/sum)."""
    out = np.zeros_like(kq)
    for hd in range(kq.shape[0]):
        for t in range(kq.shape[1]):
            seen = t + 1
            w = (kq[hd, t, :seen] * F32(scale)).astype(F32)
            e = v_expf((w - w.max()).astype(F32))
            total = sum(float(reduce16(c)) for c in padded(e, 16).reshape(-1, 16))
            out[hd, t, :seen] = (e * F32(1.0 / total)).astype(F32)
    return out


def swiglu(gate, up):
    """x / (1 + v_expf(-x)) · up, as `ggml_vec_swiglu_f32` on AVX-512."""
    silu = (gate / (F32(1) + v_expf((F32(0) - gate).astype(F32))).astype(F32)).astype(F32)
    return (silu * up).astype(F32)


# --- the checks -------------------------------------------------------------------------------

def share_exact(name, ours, theirs, rows):
    ours, theirs = np.asarray(ours, F32), np.asarray(theirs, F32)
    exact = float(np.mean(ours == theirs))
    rows.append((name, exact, float(np.abs(ours - theirs).max())))


def main():
    reader = gguf.GGUFReader(str(MODEL))
    field = lambda k: float(reader.fields[k].parts[-1][0])
    eps = field("llama.attention.layer_norm_rms_epsilon")
    theta = field("llama.rope.freq_base")
    dims = int(field("llama.rope.dimension_count"))
    n_head = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    group = n_head // n_kv
    with open(FIXTURES / "logprobs_llamacpp.json", encoding="utf-8") as f:
        ids = json.load(f)["texts"][0]["tokens"][:TOKENS]
    w = lambda name: quant_rows(reader, name)

    rows = []
    g = trace(ids, n_batch=512)[0]  # the prompt as one batch: one graph
    x = g["embd"][0, 0]
    share_exact("rms_norm (f64 sum)", rms_norm(x, eps), g["norm-0"][0, 0], rows)
    xn = g["attn_norm-0"][0, 0]
    share_exact("Q4_1 x Q8_1 mat-mul (attn_q)", quant_matmul(w("blk.0.attn_q.weight"), xn),
                g["Qcur-0"][0, 0], rows)
    share_exact("rope (f32 theta cache, fma)", rope(g["Qcur-0#1"][0], theta, dims),
                g["Qcur-0#2"][0], rows)
    q, k, v = f16(g["Qcur-0#2"][0]), f16(g["Kcur-0#2"][0]), f16(g["Vcur-0#1"][0])
    kq = g["kq-0"][0]
    ours = np.stack([dot_tinyblas(q[:, h, None, :], k[None, :, h // group, :])
                     for h in range(n_head)])
    share_exact("K·Q, batch: f16, tinyBLAS order", ours, kq[:, :, :len(ids)], rows)
    ours = np.stack([dot_vec_f16(q[:, h, None, :], k[None, :, h // group, :])
                     for h in range(n_head)])
    share_exact("  control: K·Q, batch, in vec_dot_f16 order", ours, kq[:, :, :len(ids)], rows)
    ours = np.stack([(q[:, h, None, :] * k[None, :, h // group, :]).sum(-1, dtype=F32)
                     for h in range(n_head)])
    share_exact("  control: K·Q, batch, f16 inputs, numpy sum", ours, kq[:, :, :len(ids)], rows)
    sm = g["kq_soft_max-0"][0]
    ours = soft_max(kq[:, :, :len(ids)], 1 / np.sqrt(dims))
    share_exact("soft_max (v_expf, f64 sum)", ours, sm[:, :, :len(ids)], rows)
    p = f16(sm[:, :, :len(ids)])
    ours = np.stack([dot_tinyblas(v[:, h // group, :].T[None], p[h][:, None, :])
                     for h in range(n_head)])
    share_exact("V·P, batch: f16, tinyBLAS order", ours, g["kqv-0"][0], rows)
    share_exact("swiglu (v_expf)", swiglu(g["ffn_gate-0"][0, 0], g["ffn_up-0"][0, 0]),
                g["ffn_swiglu-0"][0, 0], rows)
    share_exact("Q4_1 x Q8_1 mat-mul (ffn_down)",
                quant_matmul(w("blk.0.ffn_down.weight"), g["ffn_swiglu-0"][0, 0]),
                g["ffn_out-0"][0, 0], rows)
    head = w("token_embd.weight")
    sample = np.arange(0, head[0].shape[0], 97)
    share_exact("Q8_0 x Q8_0 output head (every 97th row)",
                quant_matmul(tuple(None if a is None else a[sample] for a in head),
                             g["result_norm"][0, 0]),
                g["result_output"][0, 0][:, sample], rows)

    steps = trace(ids, n_batch=1)  # a token at a time: one graph per token
    last = steps[-1]
    keys = f16(np.concatenate([s["Kcur-0#2"][0] for s in steps]))
    values = f16(np.concatenate([s["Vcur-0#1"][0] for s in steps]))
    q1 = f16(last["Qcur-0#2"][0][0])
    ours = np.stack([dot_vec_f16(q1[h][None], keys[:, h // group, :]) for h in range(n_head)])
    share_exact("K·Q, one token: f16, vec_dot_f16 order", ours, last["kq-0"][0][:, 0, :len(ids)],
                rows)
    p1 = f16(last["kq_soft_max-0"][0][:, 0, :len(ids)])
    ours = np.stack([dot_vec_f16(values[:, h // group, :].T, p1[h][None])
                     for h in range(n_head)])
    share_exact("V·P, one token: f16, vec_dot_f16 order", ours, last["kqv-0"][0][:, 0], rows)
    batch_logits = g["result_output"][0, 0][-1]
    share_exact("logits: batch vs one token (llama.cpp itself)", batch_logits,
                last["result_output"][0, 0][0], rows)

    print(f"llama-cpp-python {llama_cpp.__version__}, {MODEL.name}, {len(ids)} tokens, layer 0")
    print(f"{'op':<48} {'bit-exact':>9} {'max |Δ|':>10}")
    for name, exact, delta in rows:
        print(f"{name:<48} {exact:>9.4f} {delta:>10.3g}")


if __name__ == "__main__":
    main()
