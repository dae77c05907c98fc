import torch

from flowopd.trainers.pretrain import debiased_ema


def test_debiased_ema_is_the_average_of_the_trained_weights_alone():
    d, init = 0.9, {"w": torch.tensor([5.0, -3.0], dtype=torch.float64)}
    ws = [torch.tensor([float(k), 2.0 * k], dtype=torch.float64) for k in range(1, 8)]
    ema = {"w": init["w"].clone()}
    for w in ws:
        ema["w"].lerp_(w, 1 - d)
    n = len(ws)
    # exact weights of the trained iterates: (1 - d) d^(n-k), renormalised to sum to 1 without the init's d^n
    expect = sum((1 - d) * d ** (n - k) * w for k, w in enumerate(ws, 1)) / (1 - d ** n)
    got = debiased_ema(ema, init, d, n)["w"]
    assert torch.allclose(got, expect, atol=1e-12)
    assert not torch.allclose(ema["w"], expect)  # the raw EMA still holds d^n of the init
    # constant trained weights come back exactly; no update leaves the EMA as it is
    const = {"w": init["w"].clone()}
    for _ in range(5):
        const["w"].lerp_(torch.ones(2, dtype=torch.float64), 1 - d)
    assert torch.allclose(debiased_ema(const, init, d, 5)["w"], torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert debiased_ema(init, init, d, 0)["w"] is init["w"]
