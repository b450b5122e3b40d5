r"""Per-layer traces with a low-rank part computed exactly: Hutch++ and XTrace on shared products.

Neural-network Hessians carry much of their mass in a few outlier eigenvalues, which is what makes
the per-layer Hutchinson estimate noisy: its per-probe variance

    Var(z_lᵀ(Hz)_l) = 2 Σ_{i≠j∈l} (H_ll)_ij² + Σ_{m≠l} ‖H_lm‖_F²        (Rademacher z)

includes every off-diagonal block, and outlier directions put mass into all of them. Deflation
(Meyer, Musco, Musco & Woodruff 2021; Epperly, Tropp & Webber 2024) computes the trace on a sketched
subspace exactly and estimates only the rest.

**Per-layer split.** For any orthonormal Q (P × s), Π = QQᵀ, and P_l the coordinate projector of
layer l, tr(H_ll) = tr(P_l H) = tr(P_l H Π) + tr(P_l H (I − Π)), where

    tr(P_l H Π) = Σ_j q_jᵀ P_l H q_j = Σ_j (q_j)_lᵀ (H q_j)_l                           (exact from HQ)
    tr(P_l H (I − Π)) = E[w_lᵀ (H w)_l],  w = (I − Π) g,  E[ggᵀ] = I, g independent of Q,

the second because (I − Π)² = I − Π and the trace is cyclic: E[gᵀ(I−Π) P_l H (I−Π) g] =
tr((I−Π) P_l H (I−Π)) = tr(P_l H (I−Π)). Every layer reads both parts from the same products. Its
per-probe variance (Rademacher g) is 2 Σ_{i≠j} (A_l)_ij² with A_l = sym((I−Π) P_l H (I−Π)): the
deflated operator replaces H, which helps when Q captures the outlier directions. The same split
gives the Gauss-Newton trace (A = G, Q still from H: unbiased for any Q), the tensor part (H − G)
and the squared row-block norms, ‖A_{l,:}‖_F² = tr(A P_l A) = Σ_j ‖(A q_j)_l‖² + E‖(A w)_l‖².

``"hutch++"`` (K = 2s + h products): s probes S, Q = orth(HS), s products HQ, h deflated probes.
Given Q the h values are independent with mean exactly tr(H_ll) whatever Q is, so
Var(T̂_l) = E_Q[Var(T̂_l | Q)] and the reported standard error (spread of the h values over √h)
is the honest conditional one.

``"xtrace"`` (K = 2m products): m probes Ω give Y = HΩ and Q = orth(Y) (QR, Y = QR), then m products
HQ. Term i is a Hutch++ estimate whose sketch is Q_(i) = orth(Y without column i) — independent of
ω_i — and whose single probe is ω_i. With u_i the unit vector along column i of R^{-T} (orthogonal
to every other column of R), Q_(i)Q_(i)ᵀ = Q(I − u_i u_iᵀ)Qᵀ, so with v_i = Q u_i, c_i = Qᵀω_i:

    exact_i,l = Σ_j (q_j)_lᵀ(Hq_j)_l − (v_i)_lᵀ (HQ u_i)_l
    w_i = ω_i − Q c_i + v_i (u_iᵀc_i),      H w_i = Y_i − HQ c_i + HQ u_i (u_iᵀc_i)

— all from the 2m products. Each term is unbiased, so their mean is; it uses a sketch of m − 1 and m
probes where Hutch++ has K/3 and K/3. The m terms share products and are *not* independent: the
reported standard error (their spread over √m, the estimator's own error estimate in Epperly et
al.) is an approximation, checked for coverage in the tests.

Samples keep the per-probe shape: ``samples[kind]`` is ``[n, L]`` whose mean is the estimate (n = h,
or m), so standard errors, the probe-budget tracker and the DDP pooling work unchanged.
"""

from __future__ import annotations

import torch

from ..engine.operator import CurvatureOperator
from ..engine.probes import sample_probes
from .reductions import layer_index, reduce_chunk

ESTIMATORS = ("hutchinson", "hutch++", "xtrace")


def split_products(estimator: str, products: int, sketch: int | None = None) -> tuple[int, int]:
    """``(sketch size, samples)`` for K = ``products``: Hutch++ (s, K − 2s) with s = K // 3; XTrace (K/2 − 1, K/2)."""
    if estimator == "xtrace":
        if products % 2 or products < 6:
            raise ValueError(f"xtrace needs an even number of products >= 6 (m probes + m products), got {products}")
        return products // 2 - 1, products // 2
    s = max(1, products // 3) if sketch is None else sketch
    h = products - 2 * s
    if s < 1 or h < 2:
        raise ValueError(
            f"hutch++ with {products} products and a sketch of {s} leaves {h} deflated probes; it needs 2·sketch + "
            "at least 2 (for a standard error): use probes >= 6 or a smaller sketch"
        )
    return s, h


def deflated_samples(
    estimator: str,
    op: CurvatureOperator,
    products: int,
    distribution: str,
    generator: torch.Generator,
    sketch: int | None = None,
) -> dict[str, torch.Tensor]:
    """``[n, L]`` per-sample, per-layer values (the ``SAMPLE_KINDS``) of ``"hutch++"`` or ``"xtrace"``."""
    if estimator == "xtrace":
        return _xtrace(op, products // 2, distribution, generator)
    return _hutchpp(op, products, distribution, generator, sketch)


def _orthonormal(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q [s, P], R [s, s])`` with yᵀ = Q̃R̃ computed in float64 (Q as rows, float32)."""
    q, r = torch.linalg.qr(y.T.to(torch.float64))
    return q.T.to(torch.float32), r


def _hutchpp(
    op: CurvatureOperator, products: int, distribution: str, generator: torch.Generator, sketch: int | None
) -> dict[str, torch.Tensor]:
    s, h = split_products("hutch++", products, sketch)
    index = layer_index(op.blocks, op.params[0].device)
    sketch_products, _ = op.matvec(sample_probes(op.params, s, distribution, generator))
    q, _ = _orthonormal(op.flatten(sketch_products))
    del sketch_products
    q_list = op.unflatten(q)
    hq, gq = op.matvec(q_list)
    exact = {kind: values.sum(0, keepdim=True) for kind, values in reduce_chunk(q_list, hq, gq, index).items()}
    del hq, gq, q_list
    g = op.flatten(sample_probes(op.params, h, distribution, generator))
    w = g - (g @ q.T) @ q  # (I − QQᵀ) g
    del g
    w_list = op.unflatten(w)
    hw, gw = op.matvec(w_list)
    deflated = reduce_chunk(w_list, hw, gw, index)
    return {kind: (exact[kind] + deflated[kind]).cpu() for kind in deflated}


def _layer_dots(op: CurvatureOperator, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``[k, L]`` float64: per-layer ⟨a_i, b_i⟩ of flat ``[k, P]`` rows (``⟨a, a⟩`` when b is None)."""
    sizes = [block.numel for block in op.blocks]
    product = a * (a if b is None else b)
    return torch.stack([part.sum(1, dtype=torch.float64) for part in torch.split(product, sizes, dim=1)], dim=1)


def _left_out_directions(r: torch.Tensor) -> torch.Tensor:
    """Row i: the unit vector u_i orthogonal to every column of R but column i (for an invertible R, column
    i of R^{-T}, normalised), or 0 when the other columns already span R's column space (then leaving ω_i
    out changes nothing: Q_(i) = Q)."""
    m = r.shape[1]
    u = torch.zeros(m, r.shape[0], dtype=r.dtype, device=r.device)
    for i in range(m):
        others = torch.cat([r[:, :i], r[:, i + 1 :]], dim=1)
        coef = torch.linalg.lstsq(others, r[:, i : i + 1]).solution
        residual = (r[:, i : i + 1] - others @ coef).squeeze(1)
        size = residual.norm()
        if size > 1e-9 * r[:, i].norm():
            u[i] = residual / size
    return u


def _xtrace(op: CurvatureOperator, m: int, distribution: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    omega = op.flatten(sample_probes(op.params, m, distribution, generator))  # [m, P]
    hy, gy = op.matvec(op.unflatten(omega))
    y_h = op.flatten(hy)
    y_g = op.flatten(gy) if gy is not None else None
    del hy, gy
    q, r = _orthonormal(y_h)  # Y = Q R (Q as rows)
    hq_list, gq_list = op.matvec(op.unflatten(q))
    hq = op.flatten(hq_list)
    gq = op.flatten(gq_list) if gq_list is not None else None
    del hq_list, gq_list
    u = _left_out_directions(r).to(torch.float32)
    v = u @ q  # [m, P], row i = Q u_i
    c = omega @ q.T  # [m, m], row i = Qᵀ ω_i
    uc = (u * c).sum(1, keepdim=True)  # u_iᵀ c_i
    w = omega - c @ q + v * uc
    out: dict[str, torch.Tensor] = {}
    parts = {"h": (y_h, hq)} | ({"g": (y_g, gq)} if gq is not None else {})
    applied = {}
    for name, (y, aq) in parts.items():
        a_v = u @ aq  # row i = A Q u_i
        a_w = y - c @ aq + a_v * uc  # row i = A w_i
        exact_trace = _layer_dots(op, q, aq).sum(0, keepdim=True) - _layer_dots(op, v, a_v)
        exact_sq = _layer_dots(op, aq).sum(0, keepdim=True) - _layer_dots(op, a_v)
        applied[name] = (aq, a_v, a_w)
        trace_kind, sq_kind = ("trace", "hess_row_sq") if name == "h" else ("gn_trace", "gn_row_sq")
        out[trace_kind] = exact_trace + _layer_dots(op, w, a_w)
        out[sq_kind] = exact_sq + _layer_dots(op, a_w)
    if "g" in applied:  # the tensor part A = H − G
        (hq_, hv, hw), (gq_, gv, gw) = applied["h"], applied["g"]
        tq, tv, tw = hq_ - gq_, hv - gv, hw - gw
        out["tensor_row_sq"] = _layer_dots(op, tq).sum(0, keepdim=True) - _layer_dots(op, tv) + _layer_dots(op, tw)
    return {kind: values.cpu() for kind, values in out.items()}
