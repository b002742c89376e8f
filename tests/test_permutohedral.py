import math

import pytest
import torch
from helpers import build, feature_map

import visattn
from visattn.attn import permutohedral
from visattn.attn.permutohedral import permutohedral_filter


def adams_naive(f, v):
    """Adams et al. (2010) permutohedral filtering, point by point with a dict as the hash table
    (their reference C++ loops, transcribed), normalised by the filtered ones."""
    n, d = f.shape
    q = d + 1
    scale = [q * math.sqrt(2 / 3) / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    table, splats = {}, []
    for p in range(n):
        elev, sm = [0.0] * q, 0.0
        for i in range(d, 0, -1):
            cf = f[p, i - 1].item() * scale[i - 1]
            elev[i] = sm - i * cf
            sm += cf
        elev[0] = sm
        greedy = [round(e / q) * q for e in elev]
        s = sum(greedy) // q
        rank = [0] * q
        for i in range(q):
            for j in range(i + 1, q):
                if elev[i] - greedy[i] < elev[j] - greedy[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(q):
            if s > 0 and rank[i] >= q - s:
                greedy[i] -= q
                rank[i] += s - q
            elif s < 0 and rank[i] < -s:
                greedy[i] += q
                rank[i] += q + s
            else:
                rank[i] += s
        bary = [0.0] * (q + 1)
        for i in range(q):
            delta = (elev[i] - greedy[i]) / q
            bary[d - rank[i]] += delta
            bary[d + 1 - rank[i]] -= delta
        bary[0] += 1 + bary[q]
        for r in range(q):
            key = tuple(greedy[i] + (r if rank[i] <= d - r else r - q) for i in range(q))
            vh = torch.cat([v[p], v.new_ones(1)])
            table[key] = table.get(key, 0) + bary[r] * vh
            splats.append((p, key, bary[r]))
    for j in range(q):
        new = {}
        for key, val in table.items():
            n1 = tuple(k + (d if i == j else -1) for i, k in enumerate(key))
            n2 = tuple(k - (d if i == j else -1) for i, k in enumerate(key))
            new[key] = val + 0.5 * (table.get(n1, 0) + table.get(n2, 0))
        table = new
    out = torch.zeros(n, v.shape[1] + 1, dtype=v.dtype)
    for p, key, b in splats:
        out[p] += b * table[key]
    return out[:, :-1] / out[:, -1:]


def exact_gaussian(f, v, sigma=1.0):
    """The O(N²) filter the lattice approximates."""
    k = torch.exp(-(torch.cdist(f, f) ** 2) / (2 * sigma**2))
    return (k @ v) / k.sum(-1, keepdim=True)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def sample(g, n, d, spread=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(g, n, d, generator=gen, dtype=torch.float64) * spread
    v = torch.randn(g, n, 3, generator=gen, dtype=torch.float64) + torch.sin(2 * f.sum(-1, keepdim=True))
    return f, v


@pytest.mark.parametrize("d", [1, 3, 8])
def test_lattice_equals_adams_reference_algorithm(d):
    f, v = sample(2, 40, d, spread=0.8, seed=d)
    got = permutohedral_filter(f, v)
    for g in range(2):
        torch.testing.assert_close(got[g], adams_naive(f[g], v[g]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("d", "bound"), [(2, 0.2), (3, 0.3)])
def test_relative_error_against_exact_gaussian_filtering(d, bound):
    """On a 16x16 map's worth of points: bounded error (the lattice kernel is a piecewise-linear
    [1, 2, 1]^(d+1) blur, not exactly Gaussian: 13-25% on such samples), far below the global-mean
    answer, and the kernel it reproduces is the unit-variance Gaussian (narrower or wider fit worse)."""
    f, v = sample(2, 256, d, spread=1.0, seed=1)
    out = permutohedral_filter(f, v)
    exact = exact_gaussian(f, v)
    err = rel_err(out, exact)
    assert err < bound, err
    assert err < 0.35 * rel_err(v.mean(1, keepdim=True).expand_as(v), exact)
    for sigma in (0.7, 1.4):
        assert err < 0.5 * rel_err(out, exact_gaussian(f, v, sigma))


def test_distant_clusters_do_not_mix_and_constants_are_preserved():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(1, 60, 4, generator=gen, dtype=torch.float64) * 0.5
    f[:, 30:] += 50.0
    v = torch.cat([torch.full((1, 30, 2), 3.0), torch.full((1, 30, 2), -1.0)], 1).double()
    torch.testing.assert_close(permutohedral_filter(f, v), v, atol=1e-12, rtol=0)


def test_hash_collisions_are_caught(monkeypatch):
    """With tiny primes, codes collide often: the exact key checks must keep the lattice exact
    (false neighbours dropped, colliding vertices rehashed) or fail loudly."""
    f, v = sample(1, 30, 2, seed=6)
    monkeypatch.setattr(permutohedral, "_PRIMES", (7, 11))  # 6 false neighbour codes on this sample
    torch.testing.assert_close(permutohedral_filter(f, v)[0], adams_naive(f[0], v[0]), atol=1e-10, rtol=1e-10)
    monkeypatch.setattr(permutohedral, "_PRIMES", (2, 3))
    with pytest.raises(RuntimeError, match="collisions"):
        permutohedral_filter(f, v)


def test_groups_are_independent():
    f, v = sample(3, 50, 3, seed=4)
    together = permutohedral_filter(f, v)
    f2 = f.clone()
    f2[1] = f[0]  # identical features in another group must not share its lattice vertices
    mixed = permutohedral_filter(f2, v)
    torch.testing.assert_close(mixed[0], together[0])
    torch.testing.assert_close(mixed[2], together[2])
    torch.testing.assert_close(permutohedral_filter(f[1:2], v[1:2])[0], together[1])


def test_feature_gradients_follow_the_barycentric_weights():
    f, v = sample(1, 20, 2, seed=5)
    f.requires_grad_(True)
    v.requires_grad_(True)
    assert torch.autograd.gradcheck(permutohedral_filter, (f, v))


def test_block_composes_features_values_and_gamma():
    block = build("permutohedral", 32, filt_f=3, n_split=2).eval()
    x = feature_map(2, 32, 5, 6)
    h, w = 5, 6
    rows = torch.arange(h, dtype=torch.float32) - h // 2
    cols = torch.arange(w, dtype=torch.float32) - w // 2
    with torch.no_grad():
        expected = torch.empty_like(x)
        for b in range(2):
            pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
            inp = torch.cat([x[b], pos * block.scaling_spatial[0]]).flatten(1)  # (C + 2, N)
            feat = torch.nn.functional.leaky_relu(
                block.conv_feat.weight[:, :, 0, 0] @ inp + block.conv_feat.bias[:, None]
            )
            desc = block.conv_desc.weight[:, :, 0, 0] @ x[b].flatten(1) + block.conv_desc.bias[:, None]
            heads = []
            for k in range(2):
                fk = feat[3 * k : 3 * k + 3].T.double()
                vk = desc[16 * k : 16 * k + 16].T.double()
                heads.append(adams_naive(fk, vk).T.float())
            expected[b] = x[b] + block.gamma * torch.cat(heads).view(32, h, w)
        torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)


def test_identity_at_init_and_attention_after():
    x = feature_map(1, 32, 6, 6)
    block = visattn.create_attn("permutohedral", 32).eval()
    with torch.no_grad():
        assert torch.equal(block(x), x)
        block.gamma.fill_(1.0)
        assert not torch.allclose(block(x), x)


@pytest.mark.parametrize("kwargs", [{"filt_f": 0}, {"n_split": 3}, {"n_split": 0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="^permutohedral: "):
        visattn.create_attn("permutohedral", 32, **kwargs)
