"""Chapter 12's checkers against wrong answers written independently of the mistake table."""

from __future__ import annotations

import torch

from attn.exercises import frequency as ex
from attn.frequency import dft_matrix, fourier_mix, mode_filter_matrix


def _dft_mix(x: torch.Tensor) -> torch.Tensor:
    """F_n x F_E as explicit DFT matrices, in complex128."""
    fn, fe = dft_matrix(x.shape[-2]), dft_matrix(x.shape[-1])
    return fn @ x.to(torch.complex128) @ fe


def test_fnet_correct_answers_written_another_way_pass() -> None:
    assert ex.check_fnet_mixing(lambda x: _dft_mix(x).real.to(x.dtype)).passed
    assert ex.check_fnet_mixing(lambda x: torch.fft.fftn(x, dim=(-1, -2)).real).passed


def test_fnet_wrong_answers_get_their_diagnosis() -> None:
    def seq_only(x):  # type: ignore[no-untyped-def]
        return (dft_matrix(x.shape[-2]) @ x.to(torch.complex128)).real.to(x.dtype)

    table = {
        seq_only: "sequence_only",
        (lambda x: _dft_mix(x).abs().to(x.dtype)): "modulus",
        (lambda x: _dft_mix(x).real.to(x.dtype) / (x.shape[-1] * x.shape[-2]) ** 0.5): "ortho",
    }
    for fn, name in table.items():
        report = ex.check_fnet_mixing(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_keep_modes_correct_answer_written_another_way_passes() -> None:
    def both_halves(x, index):  # type: ignore[no-untyped-def]
        n = x.shape[1]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[index] = True
        keep[(n - index) % n] = True  # each mode with its conjugate partner
        spec = torch.fft.fft(x, dim=1) * keep[None, :, None]
        return torch.fft.ifft(spec, dim=1).real

    assert ex.check_keep_modes(both_halves).passed


def test_keep_modes_wrong_answers_get_their_diagnosis() -> None:
    def default_length(x, index):  # type: ignore[no-untyped-def]
        spec = torch.fft.rfft(x, dim=1)
        keep = torch.zeros(spec.shape[1], dtype=torch.bool)
        keep[index] = True
        return torch.fft.irfft(torch.where(keep[None, :, None], spec, 0), n=None, dim=1)

    def to_slots(x, index):  # type: ignore[no-untyped-def]
        spec = torch.fft.rfft(x, dim=1)
        picked = spec.index_select(1, index)
        rest = spec.new_zeros(spec.shape[0], spec.shape[1] - len(index), spec.shape[2])
        return torch.fft.irfft(torch.cat([picked, rest], 1), n=x.shape[1], dim=1)

    table = {default_length: "irfft_without_n", to_slots: "slot_write_back"}
    for fn, name in table.items():
        report = ex.check_keep_modes(fn)
        assert not report.passed and report.mistake == name, (name, report.text())


def test_the_solutions_agree_with_the_library() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 6, generator=g)
    torch.testing.assert_close(ex.fnet_mixing(x), fourier_mix(x), atol=1e-4, rtol=1e-4)
    x = torch.randn(2, 15, 3, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 2, 3, 6])
    p = mode_filter_matrix(15, index)
    torch.testing.assert_close(ex.keep_modes(x, index), torch.einsum("ts,bse->bte", p, x))


def test_values() -> None:
    assert ex.check_self_weight(15 / 64).passed
    assert ex.check_self_weight(0.125).mistake == "no_conjugates"
    assert ex.check_self_weight(0.3).mistake == "generic"
