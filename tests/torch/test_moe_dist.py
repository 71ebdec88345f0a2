"""lowband.torch.moe on real gloo ranks: the global load balancer on 2 and 4
ranks equals the single-process loss over the concatenated batch (values
and gradients, with padding and gradient accumulation), and expert
parallelism on 2 ranks equals the single-process layer."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

from lowband.torch import moe  # noqa: E402
from _dist import CountingDist, spawn  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

H, E, K, T, M = 6, 8, 2, 12, 3


def rank_data(m, j):
    """Micro-batch m of rank j: tokens [T, H] and a padding mask (ranks have
    different numbers of valid tokens)."""
    g = torch.Generator().manual_seed(1000 * m + j)
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    mask = torch.ones(T, dtype=torch.bool)
    mask[T - (j + m) % 4:] = False
    return x, mask


def router():
    g = torch.Generator().manual_seed(7)
    return torch.randn(H, E, generator=g, dtype=torch.float64).requires_grad_(True)


def run_balancer(balancer, batches, sync):
    """Gradient accumulation over micro-batches (main loss / M convention,
    aux attached with scale 1 / M); returns (losses, router grad, counts)."""
    w = router()
    losses, routings = [], []
    for m, (x, mask) in enumerate(batches):
        r = moe.route(x @ w, K)
        key = balancer.accumulate(r, mask, micro_batch=m)
        assert balancer.accumulate(r, mask, micro_batch=m) == key      # a recompute: no-op
        routings.append((r, mask))
    if sync == "step":
        balancer.sync()
    for m, (r, mask) in enumerate(routings):
        loss = balancer.loss(r, mask, micro_batch=m)
        again = balancer.loss(r, mask, micro_batch=m)
        assert float(again.detach()) == float(loss.detach())
        losses.append(float(loss.detach()))
        out = moe.attach_aux_loss(torch.zeros(1, dtype=torch.float64, requires_grad=True), loss,
                                  scale=1.0 / M)
        out.sum().backward()
    return losses, w.grad.clone(), balancer.counts.clone()


def balancer_rank(rank, world, sync):
    batches = [rank_data(m, rank) for m in range(M)]
    bal = moe.GlobalLoadBalancer(E, K, sync=sync)
    assert bal.world_size == world
    with CountingDist() as cd:
        losses, grad, counts = run_balancer(bal, batches, sync)
    calls = cd.calls
    dist.all_reduce(grad)
    grad /= world                                  # what DDP does
    return losses, grad, counts, calls


def single_process(world, sync):
    single = moe.GlobalLoadBalancer(E, K, sync=sync)
    batches = []
    for m in range(M):
        parts = [rank_data(m, j) for j in range(world)]
        batches.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return run_balancer(single, batches, sync)


def check_balancer(results, world, sync):
    want_losses, want_grad, want_counts = single_process(world, sync)
    for losses, grad, counts, calls in results:
        assert calls == (M if sync == "micro" else 1)       # one all_reduce per micro-batch/step
        torch.testing.assert_close(grad, want_grad, rtol=1e-11, atol=1e-14)
        assert torch.equal(counts, want_counts)
    mean_losses = np.mean([r[0] for r in results], axis=0)
    np.testing.assert_allclose(mean_losses, want_losses, rtol=1e-12)
    assert want_grad.abs().sum() > 0


@pytest.mark.slow
def test_global_balancer_on_four_ranks():
    check_balancer(spawn(balancer_rank, 4, "micro", timeout=180), 4, "micro")


# ------------------------------------------------------ expert parallelism ----

HE, FE, EE = 5, 4, 4


def layers(kind, group, scale):
    kw = dict(dtype=torch.float64, shared_expert=3, aux_coef=0.1, aux_scope="global",
              aux_scale=scale)
    if kind == "moe":
        torch.manual_seed(3)
        full = moe.MoE(HE, FE, EE, 2, **kw)
        if group is None:
            return full, full
        torch.manual_seed(3)
        part = moe.MoE(HE, FE, EE, 2, expert_parallel_group=group, process_group=group, **kw)
    else:
        torch.manual_seed(4)
        full = moe.ChainOfExperts(HE, FE, EE, 1, iterations=2, **kw)
        if group is None:
            return full, full
        torch.manual_seed(4)
        part = moe.ChainOfExperts(HE, FE, EE, 1, iterations=2, expert_parallel_group=group,
                                  process_group=group, **kw)
    return full, part


def copy_slice(full, part, rank, world):
    El = EE // world
    with torch.no_grad():
        for (name, p), (_, q) in zip(full.named_parameters(), part.named_parameters()):
            if name.startswith("experts."):
                q.copy_(p[rank * El:(rank + 1) * El])
            else:
                q.copy_(p)


def ep_data(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return (torch.randn(9 + 2 * rank, HE, generator=g, dtype=torch.float64),
            torch.randn(9 + 2 * rank, HE, generator=g, dtype=torch.float64))


def two_rank_scenario(rank, world):
    """Everything that runs on 2 ranks, in one spawn (processes are slow to start)."""
    return dict(micro=balancer_rank(rank, world, "micro"), step=balancer_rank(rank, world, "step"),
                ep=ep_rank(rank, world), ddp=ddp_rank(rank, world))


def ddp_model():
    torch.manual_seed(9)
    return moe.MoE(HE, FE, EE, 2, aux_scope="global", aux_coef=0.3, aux_scale=1.0 / 2,
                   dtype=torch.float64)


def ddp_data(m, rank):
    g = torch.Generator().manual_seed(300 + 10 * m + rank)
    x = torch.randn(7 + rank, HE, generator=g, dtype=torch.float64)
    return x, torch.randn(7 + rank, HE, generator=g, dtype=torch.float64)


def ddp_rank(rank, world):
    """The documented loop: DDP, 2 micro-batches under no_sync, main loss / M,
    aux_scale = 1 / M, balancers reset by the optimizer step."""
    import contextlib
    from torch.nn.parallel import DistributedDataParallel as DDP
    layer = ddp_model()
    model = DDP(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    layer.balancers[0].reset_on_step(opt)
    for m in range(2):
        ctx = model.no_sync() if m == 0 else contextlib.nullcontext()
        with ctx:
            x, R = ddp_data(m, rank)
            ((model(x, micro_batch=m) * R).sum() / 2).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    assert layer.balancers[0].tokens == 0
    return grads


def ep_rank(rank, world):
    out = {}
    for kind in ("moe", "coe"):
        full, part = layers(kind, dist.group.WORLD, 1.0 / world)
        copy_slice(full, part, rank, world)
        x, R = ep_data(rank)
        x.requires_grad_(True)
        y = part(x)
        (y * R).sum().backward()
        grads = {n: p.grad.clone() for n, p in part.named_parameters()}
        for n, g in grads.items():
            if not n.startswith("experts."):
                dist.all_reduce(g)                   # replicated parameters: summed
        out[kind] = (y.detach(), x.grad.clone(), grads, float(part.aux_loss))
    return out


def test_two_ranks_balancer_and_expert_parallelism():
    """GlobalLoadBalancer (sync micro and step) equals the single-process
    loss over the concatenated batch; MoE and ChainOfExperts with experts
    split over 2 ranks equal the single-process layers."""
    world = 2
    all_results = spawn(two_rank_scenario, world, timeout=180)
    for sync in ("micro", "step"):
        check_balancer([r[sync] for r in all_results], world, sync)
    # DDP + gradient accumulation + global balancer = one process, whole batch
    single = ddp_model()
    for m in range(2):
        parts = [ddp_data(m, r) for r in range(world)]
        x = torch.cat([p[0] for p in parts])
        R = torch.cat([p[1] for p in parts])
        ((single(x, micro_batch=m) * R).sum() / (2 * world)).backward()
    for res in all_results:
        for n, p in single.named_parameters():
            torch.testing.assert_close(res["ddp"][n], p.grad, rtol=1e-10, atol=1e-12, msg=n)
    results = [r["ep"] for r in all_results]
    for kind in ("moe", "coe"):
        full, _ = layers(kind, None, 1.0)
        data = [ep_data(r) for r in range(world)]
        x = torch.cat([d[0] for d in data]).requires_grad_(True)
        R = torch.cat([d[1] for d in data])
        y = full(x)
        (y * R).sum().backward()
        rows = np.cumsum([0] + [d[0].shape[0] for d in data])
        El = EE // world
        aux = []
        for rank, res in enumerate(results):
            yr, gx, grads, aux_r = res[kind]
            sl = slice(rows[rank], rows[rank + 1])
            torch.testing.assert_close(yr, y.detach()[sl], rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(gx, x.grad[sl], rtol=1e-10, atol=1e-12)
            for n, p in full.named_parameters():
                want = p.grad[rank * El:(rank + 1) * El] if n.startswith("experts.") else p.grad
                torch.testing.assert_close(grads[n], want, rtol=1e-10, atol=1e-12, msg=n)
            aux.append(aux_r)
        assert abs(np.mean(aux) - float(full.aux_loss)) < 1e-12 * float(full.aux_loss)
