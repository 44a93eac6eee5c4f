"""The one attention interface: a contract every registered sequence mixer keeps, and the kernel registry.

Parametrised over the registry, so a new mechanism is checked without a line here:
``layer(x, *, key_mask=..., is_causal=..., need_weights=True)`` with keyword-only
options, weights ``(B, h, n, n)``, causality honoured (or refused with a clear
error), float64 and bfloat16.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch
from torch import nn

import attn
from attn.attention import KERNELS, Attention, AttentionBase, get_kernel, kernels
from attn.registry import mechanisms

E, H, B, N = 16, 2, 2, 12
PKG = pathlib.Path(attn.__file__).parent
SEQUENCE = [m for m in mechanisms() if m.build is not None]


def _build(m: attn.registry.Mechanism, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    assert m.build is not None
    return m.build(E, H).eval()


def _x(dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, N, E, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("m", SEQUENCE, ids=lambda m: m.name)
def test_registry_records_kernel_and_causality(m: attn.registry.Mechanism) -> None:
    assert isinstance(m.causal, bool), f"{m.name}: register(..., causal=True/False) says whether build's layer is causal"
    if m.kernel is not None:
        assert m.kernel in KERNELS, f"{m.name}: kernel {m.kernel!r} is not registered"
        layer = _build(m)
        assert isinstance(layer, AttentionBase) and layer.kernel == m.kernel, (
            f"{m.name}: registered kernel {m.kernel!r}, but build() gives {type(layer).__name__} running "
            f"{getattr(layer, 'kernel', None)!r}")


@pytest.mark.parametrize("m", SEQUENCE, ids=lambda m: m.name)
def test_forward_options_are_keyword_only(m: attn.registry.Mechanism) -> None:
    layer = _build(m)
    # (isinstance(layer, SequenceMixer) would pass for any callable: the protocol has only __call__, so the
    # signature itself is what is checked)
    params = inspect.signature(layer.forward).parameters
    for name in ("key_mask", "is_causal", "need_weights"):
        assert name in params, f"{m.name}: forward has no {name}="
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, f"{m.name}: {name} must be keyword-only"
    assert params["is_causal"].default is None and params["need_weights"].default is False


@pytest.mark.parametrize("m", SEQUENCE, ids=lambda m: m.name)
def test_weights_are_batch_heads_queries_keys(m: attn.registry.Mechanism) -> None:
    layer, x = _build(m), _x()
    km = torch.ones(B, N, dtype=torch.bool)
    km[1, -3:] = False
    out, w = layer(x, key_mask=km, need_weights=True)
    assert out.shape == (B, N, E)
    assert w is not None and isinstance(w, torch.Tensor), f"{m.name}: need_weights=True returned no weight tensor"
    assert w.ndim == 4 and w.shape[0] == B and w.shape[-2:] == (N, N), f"{m.name}: weights {tuple(w.shape)}"
    assert w.shape[1] >= 1
    assert w[1, ..., -3:].abs().max() == 0, f"{m.name}: weight on padded keys"
    out2, w2 = layer(x, key_mask=km)
    assert w2 is None
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)


def _honours_causality(layer: nn.Module, **kw: object) -> None:
    x = _x()
    y = x.clone()
    y[:, N // 2:] = torch.randn(B, N - N // 2, E)
    a, _ = layer(x, **kw)
    b, _ = layer(y, **kw)
    torch.testing.assert_close(a[:, : N // 2], b[:, : N // 2], atol=1e-5, rtol=1e-5)
    assert (a[:, N // 2:] - b[:, N // 2:]).abs().max() > 1e-4


@pytest.mark.parametrize("m", SEQUENCE, ids=lambda m: m.name)
def test_is_causal_is_honoured_or_refused(m: attn.registry.Mechanism) -> None:
    layer = _build(m)
    if m.causal:
        _honours_causality(layer)  # causal as built
    try:
        _honours_causality(layer, is_causal=True)
    except ValueError as err:
        assert "causal" in str(err), f"{m.name}: refusing is_causal=True must say why: {err}"
        assert not m.causal
    if not m.causal:  # a bidirectional layer lets an early query see a late key
        x = _x()
        y = x.clone()
        y[:, 1] += 1.0  # a key a windowed layer also sees from query 0
        a, _ = layer(x)
        b, _ = layer(y)
        assert (a[:, 0] - b[:, 0]).abs().max() > 1e-6, f"{m.name}: registered causal=False, but query 0 ignores key 1"


@pytest.mark.parametrize("m", SEQUENCE, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_dtypes(m: attn.registry.Mechanism, dtype: torch.dtype) -> None:
    layer = _build(m).to(dtype)
    x = _x(dtype)
    try:
        out, w = layer(x, need_weights=True)
    except TypeError as err:  # a mechanism may refuse a dtype (an FFT without bfloat16 on the CPU), clearly
        assert dtype == torch.bfloat16 and "bfloat16" in str(err), f"{m.name}: {err}"
        return
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert w is not None and torch.isfinite(w).all()


def test_kernel_registry_is_complete_and_documented() -> None:
    ks = kernels()
    assert "sdpa" in KERNELS and len(ks) >= 1
    for spec in ks:
        assert spec.summary, f"kernel {spec.name!r} has no summary"
        params = inspect.signature(spec.fn).parameters
        for name in ("attn_mask", "key_mask", "is_causal", "scale", "dropout_p", "need_weights"):
            assert name in params and params[name].kind is inspect.Parameter.KEYWORD_ONLY, (
                f"kernel {spec.name!r}: {name} must be keyword-only")
    with pytest.raises(KeyError, match=r"registered: .*sdpa"):
        get_kernel("no-such-kernel")


@pytest.mark.parametrize("name", sorted(spec.name for spec in kernels()))
def test_every_kernel_outputs_its_weights_times_values(name: str) -> None:
    """Called alone, with its options' defaults: ``output = weights @ v`` per head, padded keys get no weight,
    rows sum to 1 (0 for a query with no visible key), and the fast path (no weights) gives the same output."""
    spec = get_kernel(name)
    g = torch.Generator().manual_seed(0)
    n = 24
    q, k, v = (torch.randn(B, H, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    km = torch.ones(B, n, dtype=torch.bool)
    km[1, -5:] = False
    kw = {"attn_mask": None, "key_mask": km, "is_causal": False, "scale": 8 ** -0.5, "dropout_p": 0.0}
    out, w = spec.fn(q, k, v, need_weights=True, **kw)
    assert out.shape == (B, H, n, 8) and w is not None and w.shape == (B, H, n, n)
    torch.testing.assert_close(out, w @ v, atol=1e-9, rtol=1e-9)
    assert w[1, :, :, -5:].abs().max() == 0
    sums = w.sum(-1)
    assert ((sums - 1).abs() < 1e-9).logical_or(sums == 0).all()
    fast, none = spec.fn(q, k, v, need_weights=False, **kw)
    assert none is None
    torch.testing.assert_close(fast, out, atol=1e-9, rtol=1e-9)


def test_attention_is_multihead_attention_with_sdpa() -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True).double().eval()
    layer = attn.MultiHeadAttention(E, H).double().load_torch_weights(ref).eval()
    assert isinstance(layer, Attention) and layer.kernel == "sdpa"
    x = _x(torch.float64)
    km = torch.ones(B, N, dtype=torch.bool)
    km[0, -4:] = False
    want, _ = ref(x, x, x, key_padding_mask=~km, need_weights=False)
    got, _ = layer(x, key_mask=km)
    torch.testing.assert_close(got * km[..., None], want * km[..., None], atol=1e-12, rtol=1e-12)


def test_grouped_query_heads_equal_repeated_keys() -> None:
    """``num_kv_heads`` = repeating each key/value head for its group of query heads (Ainslie et al. 2023)."""
    torch.manual_seed(0)
    gqa = Attention(E, 4, num_kv_heads=2, causal=True).double()
    full = Attention(E, 4, causal=True).double()
    with torch.no_grad():
        full.q_proj.load_state_dict(gqa.q_proj.state_dict())
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        d = gqa.head_dim
        for src, dst in ((gqa.k_proj, full.k_proj), (gqa.v_proj, full.v_proj)):
            w = src.weight.view(2, d, E).repeat_interleave(2, 0).reshape(4 * d, E)
            b = src.bias.view(2, d).repeat_interleave(2, 0).reshape(4 * d)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
    x = _x(torch.float64)
    torch.testing.assert_close(gqa(x).output, full(x).output, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("position", [None, "rope", "alibi"])
def test_cached_decoding_equals_one_pass(position: str | None) -> None:
    torch.manual_seed(0)
    layer = Attention(E, 4, num_kv_heads=2, causal=True, position=position).double().eval()
    x = _x(torch.float64)
    full = layer(x).output
    cache = layer.new_cache(B, N)
    steps = [layer(x[:, :5], cache=cache).output]
    steps += [layer(x[:, t: t + 1], cache=cache).output for t in range(5, N)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=1e-12)


def test_attention_bad_input_names_what_was_expected() -> None:
    with pytest.raises(KeyError, match="unknown attention kernel 'nope'"):
        Attention(E, H, kernel="nope")
    with pytest.raises(TypeError, match="kernel must be the name"):
        Attention(E, H, kernel=len)  # type: ignore[arg-type]  # the wrong type on purpose
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        Attention(E, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="position must be None, 'rope' or 'alibi'"):
        Attention(E, H, position="learned")  # type: ignore[arg-type]  # the wrong value on purpose
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        Attention(E, H)(_x(), is_causal=1)  # type: ignore[arg-type]  # the wrong type on purpose


MECHANISM_FILES = sorted(
    p for p in PKG.glob("*.py")
    if p.stem not in attn.registry.SUPPORT_MODULES and not p.stem.startswith("_") and p.stem != "attention"
)


@pytest.mark.parametrize("path", MECHANISM_FILES, ids=lambda p: p.stem)
def test_layers_never_import_experiments_training_or_plots(path: pathlib.Path) -> None:
    banned = {"train", "tasks", "models", "widgets", "plotting", "experiments", "compare", "notebook"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            mod = (node.module or "").split(".")[0]
            names = {a.name for a in node.names} if not node.module else {mod}
            assert not names & banned, f"{path.name}:{node.lineno} imports {sorted(names & banned)}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                assert not any(mod == f"attn.{b}" or mod.startswith(f"attn.{b}.") for b in banned), (
                    f"{path.name}:{node.lineno} imports {mod}")


@pytest.mark.parametrize("m", [m for m in mechanisms() if m.build is None], ids=lambda m: m.name)
def test_every_other_mechanism_has_its_own_task_in_experiments(m: attn.registry.Mechanism) -> None:
    """A mechanism without a sequence ``build`` is measured on its own task, declared in attn/experiments."""
    from attn.experiments import SIZES, own_task

    assert m.own_task is not None, f"{m.name}: no OWN_TASKS entry in attn/experiments"
    task = own_task(m.name, "quick")
    assert isinstance(task, attn.registry.OwnTask) and task.sizes
    with pytest.raises(ValueError, match="unknown task size 'default'"):
        own_task(m.name, "default")  # the old preset name: a preset names a size, never the other way round
    assert SIZES == ("quick", "book", "full", "large")


def test_no_sequence_mechanism_also_declares_an_own_task() -> None:
    both = [m.name for m in mechanisms() if m.build is not None and m.own_task is not None]
    assert not both, f"registered with a sequence build and an own task: {both}"
