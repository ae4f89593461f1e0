"""Which noise prediction each row of a batched prior call asks for.

    COND        conditioned on the row's prompt (view-dependent / Perp-Neg interpolated when enabled)
    UNCOND      the unconditional prediction (empty prompt)
    NEGATIVE_1  Perp-Neg's first negative view prompt (Stable Diffusion prior with prior.perp_neg)
    NEGATIVE_2  Perp-Neg's second negative view prompt

``predict_noise(x_t, t, prompts, cameras, branch)`` takes one code per row as a long tensor [N]
(a bool tensor works as COND / UNCOND).
"""

COND, UNCOND, NEGATIVE_1, NEGATIVE_2 = 0, 1, 2, 3
