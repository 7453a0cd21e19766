"""k-means backends: planted recovery, agreement, determinism, batching, edge cases."""

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mergekit_lora.kmeans import kmeans, kmeans_pp
from mergekit_lora.kmeans.seeding import gram
from mergekit_lora.kmeans.torch_backend import lloyd


def planted(M=3, N=48, D=16, k=4, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(M, k, D, generator=g, dtype=torch.float64) * 3
    truth = torch.arange(N) % k
    X = centres[:, truth] + noise * torch.randn(M, N, D, generator=g, dtype=torch.float64)
    return X, truth


def gens(M, seed=0):
    return [torch.Generator().manual_seed(seed + m) for m in range(M)]


@pytest.mark.parametrize("backend", ["torch", "sklearn", "faiss"])
def test_backends_recover_planted_and_agree(backend):
    X, truth = planted()
    res = kmeans(X, 4, generators=gens(3), backend=backend, n_init=2)
    ref = kmeans(X, 4, generators=gens(3), backend="torch", n_init=2)
    for m in range(3):
        assert adjusted_rand_score(truth, res.labels[m]) == 1.0
        # same seeds -> the very same labelling, not only the same partition
        assert torch.equal(res.labels[m], ref.labels[m])
    assert torch.allclose(res.inertia, ref.inertia, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "sklearn", "faiss"])
def test_deterministic_for_a_seed(backend):
    X, _ = planted(noise=1.5, seed=3)  # overlapping clusters: the seed matters
    a = kmeans(X, 5, generators=gens(3, 7), backend=backend, n_init=3)
    b = kmeans(X, 5, generators=gens(3, 7), backend=backend, n_init=3)
    assert torch.equal(a.labels, b.labels)


def test_torch_batch_equals_one_set_at_a_time():
    X, _ = planted(noise=1.0, seed=5)
    batched = kmeans(X, 4, generators=gens(3), backend="torch", n_init=2)
    for m in range(3):
        single = kmeans(X[m:m + 1], 4, generators=[gens(3)[m]], backend="torch", n_init=2)
        assert torch.equal(single.labels[0], batched.labels[m])


def test_edge_cases_k_ge_n_k1_duplicates_zeros():
    X, _ = planted(M=2, N=6)
    assert torch.equal(kmeans(X, 6, generators=gens(2)).labels, torch.arange(6).expand(2, 6))
    assert torch.equal(kmeans(X, 9, generators=gens(2)).labels, torch.arange(6).expand(2, 6))
    one = kmeans(X, 1, generators=gens(2))
    assert one.labels.eq(0).all()
    assert torch.allclose(one.inertia, ((X - X.mean(1, keepdim=True)) ** 2).sum((1, 2)))
    # two distinct points, each repeated: k = 3 leaves one cluster empty, never splits a duplicate group
    dup = torch.cat([torch.ones(1, 4, 3), -torch.ones(1, 4, 3)], 1).double()
    lab = kmeans(dup, 3, generators=gens(1)).labels[0]
    assert len(set(lab[:4].tolist())) == 1 and len(set(lab[4:].tolist())) == 1 and lab[0] != lab[4]
    zeros = kmeans(torch.zeros(1, 5, 3, dtype=torch.float64), 2, generators=gens(1))
    assert zeros.labels.eq(zeros.labels[0, 0]).all() and float(zeros.inertia[0]) == 0.0


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    X = torch.tensor([[[0.0], [0.0], [5.0], [5.2], [20.0]]], dtype=torch.float64)
    seeds = torch.tensor([[0, 1, 2]])  # seeds 0 and 1 coincide: cluster 1 starts empty (ties go to 0)
    labels, inertia = lloyd(X, gram(X), seeds, 50)
    assert labels[0].tolist() == [0, 0, 2, 2, 1]  # 20.0, the farthest from its centre, took the empty cluster
    assert float(inertia[0]) == pytest.approx(0.02)


def test_kmeans_pp_is_seeded_and_spreads():
    X, truth = planted(M=1, N=40, k=4, noise=0.01)
    a = kmeans_pp(gram(X), 4, gens(1, 11))
    b = kmeans_pp(gram(X), 4, gens(1, 11))
    assert torch.equal(a, b)
    # with tight clusters k-means++ puts one seed in each cluster
    assert sorted(truth[a[0]].tolist()) == [0, 1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_cpu():
    X, truth = planted()
    cpu = kmeans(X, 4, generators=gens(3), backend="torch", n_init=2)
    gpu = kmeans(X.cuda().float(), 4, generators=gens(3), backend="torch", n_init=2, device=torch.device("cuda"))
    assert torch.equal(cpu.labels, gpu.labels)
