"""The identities the rank-unit representation promises, checked against dense math."""

import torch
from helpers import rel
from hypothesis import given, settings
from hypothesis import strategies as st

from mergekit_lora.lowrank import singular_values, truncate
from mergekit_lora.units import RankUnits, balance_scale, canonical_factors, sign_rule


def rand_units(r, d_out=12, d_in=9, seed=0, source=0):
    g = torch.Generator().manual_seed(seed)
    return RankUnits.from_factors(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g),
                                  scale=0.7, source=source)


@settings(max_examples=25, deadline=None)
@given(r=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_permutation_and_canonical_keep_delta(r, seed):
    u = rand_units(r, seed=seed)
    perm = torch.randperm(r, generator=torch.Generator().manual_seed(seed))
    assert rel(u.permuted(perm).delta(), u.delta()) < 1e-6
    c = u.canonical()
    assert rel(c.delta(), u.delta()) < 1e-6
    assert torch.allclose(c.A.norm(dim=1), c.B.norm(dim=0), rtol=1e-5)
    # the sign rule: the largest-|.| entry of each a_i is positive, and it is idempotent
    assert bool((c.A.gather(1, c.A.abs().argmax(1, keepdim=True)) > 0).all())
    assert torch.allclose(c.canonical().A, c.A, rtol=1e-6, atol=1e-7)


def test_canonical_removes_scale_and_sign_ambiguity():
    u = rand_units(3, seed=1)
    v = u.with_factors(-2.5 * u.A, -u.B / 2.5)
    assert torch.allclose(u.canonical().A, v.canonical().A, atol=1e-6)
    assert torch.allclose(u.canonical().B, v.canonical().B, atol=1e-6)


def _canonical_reference(A, B):
    """The one-module canonical form written out step by step (balance, mask zero units, sign rule)."""
    c, nonzero = balance_scale(A.norm(dim=1), B.norm(dim=0))
    A = A * c[:, None]
    B = B / torch.where(nonzero, c, 1)[None, :] * nonzero[None, :]
    sign = sign_rule(A)
    return A * sign[:, None], B * sign[None, :]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), zero=st.booleans())
def test_batched_canonical_factors_equal_the_step_by_step_form_bitwise(seed, zero):
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(3, 5, 40, generator=g), torch.randn(3, 70, 5, generator=g) * 3
    if zero:  # zero units (a zero half) stay zero
        A[1, 2] = 0
        B[2, :, 4] = 0
    Ab, Bb = canonical_factors(A, B)
    for m in range(3):
        Ar, Br = _canonical_reference(A[m], B[m])
        assert torch.equal(Ab[m], Ar) and torch.equal(Bb[m], Br)
        u = RankUnits.from_factors(A[m], B[m]).canonical()
        assert torch.equal(u.A, Ar) and torch.equal(u.B, Br)


@settings(max_examples=25, deadline=None)
@given(r1=st.integers(1, 6), r2=st.integers(1, 6), w1=st.floats(-2, 2), w2=st.floats(-2, 2), seed=st.integers(0, 999))
def test_concat_is_weighted_sum_and_factor_norms_are_dense_norms(r1, r2, w1, w2, seed):
    a, b = rand_units(r1, seed=seed), rand_units(r2, seed=seed + 1, source=1)
    cat = RankUnits.concat([a.scaled(w1), b.scaled(w2)])
    dense = w1 * a.delta() + w2 * b.delta()
    assert cat.rank == r1 + r2
    assert cat.source.tolist() == [0] * r1 + [1] * r2
    assert torch.allclose(cat.delta(), dense, atol=1e-5)
    assert abs(cat.norm() - float(dense.double().norm())) <= 1e-5 * max(1.0, float(dense.norm()))
    assert abs(a.inner(b) - float((a.delta().double() * b.delta().double()).sum())) < 1e-6 * max(
        1.0, a.norm() * b.norm())
    d = float((a.delta().double() - b.delta().double()).norm())
    assert abs(a.distance(b) - d) < 1e-6 * max(1.0, d)


def test_truncate_is_eckart_young_optimal():
    u = RankUnits.concat([rand_units(6, seed=s) for s in range(3)])  # rank 18 in 12×9
    dense_s = torch.linalg.svdvals(u.B.double() @ u.A.double())
    assert torch.allclose(singular_values(u)[: dense_s.shape[0]], dense_s, rtol=1e-8, atol=1e-10)
    for k in (1, 4, 8):
        t = truncate(u, k)
        tail = float(dense_s[k:].pow(2).sum().sqrt())
        assert abs(t.distance(u) - tail) <= 1e-6 * float(dense_s.norm())
        assert t.rank == k and bool((t.source == -1).all())


def test_conv_units_restore_kernel_shape():
    A = torch.randn(2, 3, 3, 3)
    B = torch.randn(8, 2, 1, 1)
    u = RankUnits.from_factors(A, B, scale=2.0, weight_shape=(8, 3, 3, 3), kind="conv")
    assert u.d_in == 27
    dense = 2.0 * (B.reshape(8, 2) @ A.reshape(2, 27)).reshape(8, 3, 3, 3)
    assert torch.allclose(u.delta_weight(), dense, atol=1e-6)


def _sign_rule_by_index(A):  # the definition: sign of the first largest-|entry| of each row (0 -> +1)
    idx = A.abs().argmax(dim=-1)
    s = torch.sign(A.gather(-1, idx[..., None])[..., 0])
    return torch.where(s == 0, torch.ones_like(s), s)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), dtype=st.sampled_from([torch.float32, torch.float64]),
       special=st.sampled_from(["none", "tie", "zero", "inf", "-inf", "nan", "ints"]))
def test_sign_rule_two_reductions_equal_the_first_index_rule(seed, dtype, special):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, 6, 33, generator=g, dtype=dtype)
    if special == "tie":  # ±m both present: the first one decides
        A[1, 3, 5], A[1, 3, 2] = 9.0, -9.0
    elif special == "zero":
        A[0, 2] = 0
    elif special in ("inf", "-inf"):
        A[0, 1, 7] = float(special)
    elif special == "nan":
        A[1, 0, 4] = float("nan")
    elif special == "ints":  # many exact ties of |x|
        A = torch.randint(-2, 3, (2, 6, 33), generator=g).to(dtype)
    got, want = sign_rule(A), _sign_rule_by_index(A)
    assert got.dtype == want.dtype
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
