"""The contract between the public ops and each fused implementation.

Every impl except ``reference`` is a module exposing two functions with the signatures below.
The public layer (``token_kl.py``) validates input, flattens rows, drops rows that need no
work, handles temperature bookkeeping, the target logit (a cheap gather-dot) and the one-hot part
of the log-prob gradient, so a backend only does the dense (rows x vocabulary) work, streaming
over the vocabulary and never materializing rows x V.

Notation (row i, vocabulary index j, T = temperature):
    z   = h  @ w.T  / T        p = softmax(z),  lse  = logsumexp(z)
    zr  = hr @ wr.T / T        r = softmax(zr), lser = logsumexp(zr)
    d   = log p - log r
    fkl = KL(r || p) = sum_j r (log r - log p)
    rkl = KL(p || r) = sum_j p (log p - log r)

forward(h, hr, w, wr, temperature) -> (lse, lser, fkl, rkl)
    h  (N, D)  float tensor, contiguous.       w  (V, D) same dtype as h.
    hr (N, Dr) or None (log-prob-only mode: return (lse, None, None, None)).
    wr (V, Dr) or None: None means the reference shares ``w`` (then Dr == D); load each tile of
       ``w`` once and use it for both dots.
    Returns float32 tensors of shape (N,).

backward(h, hr, w, wr, temperature, lse, lser, fkl, rkl, g_fkl, g_rkl, g_lp, g_lpr,
         need_h, need_hr, need_w, need_wr) -> (dh, dhr, dw, dwr)
    The dense gradient w.r.t. the logits of each row is
        G  = g_fkl * (p - r) + g_rkl * p * (d - rkl) - g_lp * p
        Gr = g_fkl * r * (-d - fkl) + g_rkl * (r - p) - g_lpr * r
    (the one-hot part of the log-prob gradients is added by the caller), and
        dh = G @ w / T, dhr = Gr @ wr / T, dw = G.T @ h / T, dwr = Gr.T @ hr / T.
    g_* are float32 (N,) tensors (g_lpr, g_fkl, g_rkl may be None = zero; in log-prob-only mode
    hr/lser/fkl/rkl are None and only G = -g_lp * p is used).
    When wr is None (shared weight) and need_w, dw holds G.T @ h / T + Gr.T @ hr / T and dwr is
    None. Gradients that are not needed are returned as None. Returned gradients are float32
    (the caller casts to the input dtype).
"""
