"""Coreset baselines (issue 15): herding and k-center greedy against brute-force float64
references, penultimate features against the classifier's input computed by hand, and the
stage's stores (right classes, right images, the selection of directly computed features, a
resumed pass equal to an uninterrupted one)."""

import itertools
import shutil

import numpy as np
import pytest
import torch
import zarr
from torch import nn
from torchvision.models import resnet18

from d3s_core.coresets import herding, k_center_greedy, penultimate_features
from storage.arrays import train_indices
from storage.config import parse_config
from storage.fs import RunFS
from storage.run import baseline_prefix, images_of, open_run
from storage.states import has_state
from tasks.stages import STAGES, open_data
from tasks.stages.common import class_rows, data_splits, load_teacher
from tasks.stages.coreset import CHECKPOINT, select_coresets

from .configs import CONFIG
from .helpers import tiny_teacher

# Brute-force references: float64 numpy, one candidate at a time.


def herding_reference(f: np.ndarray, k: int) -> list[int]:
    mu, chosen, total = f.mean(0), [], np.zeros(f.shape[1])
    for t in range(1, k + 1):
        best, best_i = np.inf, -1
        for i in range(len(f)):
            if i not in chosen:
                d = np.linalg.norm(mu - (total + f[i]) / t)
                if d < best:  # strict: ties keep the lowest index
                    best, best_i = d, i
        chosen.append(best_i)
        total = total + f[best_i]
    return chosen


def k_center_reference(f: np.ndarray, k: int) -> list[int]:
    if k == 0:
        return []
    mu = f.mean(0)
    chosen = [int(np.argmin([np.linalg.norm(x - mu) for x in f]))]
    while len(chosen) < k:
        best, best_i = -np.inf, -1
        for i in range(len(f)):
            if i not in chosen:
                d = min(np.linalg.norm(f[i] - f[j]) for j in chosen)
                if d > best:
                    best, best_i = d, i
        chosen.append(best_i)
    return chosen


def covering_radius(f: np.ndarray, centres) -> float:
    """max over samples of the distance to the nearest centre."""
    d = np.linalg.norm(f[:, None, :] - f[None, list(centres), :], axis=2)
    return float(d.min(1).max())


def features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 3 + torch.rand(d, generator=g)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [0, 1, 2, 5, 17, 24])
def test_herding_matches_brute_force(seed, k):
    f = features(24, 6, seed)
    got = herding(f, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == herding_reference(f.double().numpy(), k)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [0, 1, 2, 5, 17, 24])
def test_k_center_matches_brute_force(seed, k):
    f = features(24, 6, seed)
    got = k_center_greedy(f, k)
    assert got.dtype == torch.int64 and got.shape == (k,)
    assert got.tolist() == k_center_reference(f.double().numpy(), k)


@pytest.mark.parametrize("seed", range(3))
def test_k_center_reference_is_max_min_and_a_2_approximation(seed):
    """Each greedy pick is the farthest point from the picks before it (a full distance
    matrix), and its covering radius is within twice the optimum found by trying every subset
    (Gonzalez 1985)."""
    f = features(10, 3, seed).double().numpy()
    dist = np.linalg.norm(f[:, None, :] - f[None, :, :], axis=2)
    for k in (2, 3, 4):
        chosen = k_center_reference(f, k)
        for t in range(1, k):
            to_chosen = dist[:, chosen[:t]].min(1)
            to_chosen[chosen[:t]] = -np.inf
            assert to_chosen[chosen[t]] == to_chosen.max()
        best = min(covering_radius(f, c) for c in itertools.combinations(range(len(f)), k))
        assert covering_radius(f, chosen) <= 2 * best + 1e-12


def test_selections_are_distinct_and_ties_go_to_the_lowest_index():
    same = torch.ones(6, 4)
    assert herding(same, 4).tolist() == [0, 1, 2, 3]
    assert k_center_greedy(same, 4).tolist() == [0, 1, 2, 3]
    f = features(9, 3, 0)
    for select in (herding, k_center_greedy):
        assert sorted(select(f, 9).tolist()) == list(range(9))


@pytest.mark.parametrize("select", [herding, k_center_greedy])
def test_k_larger_than_n_is_refused(select):
    with pytest.raises(ValueError, match=r"k=7 .* n=6"):
        select(torch.zeros(6, 2), 7)


def test_herding_tracks_the_mean_better_than_random_selection():
    """The property herding is chosen for: its running mean is nearer the class mean than a
    random subset's, at every size, averaged over draws."""
    g = torch.Generator().manual_seed(0)
    herd, rand = np.zeros(10), np.zeros(10)
    for seed in range(20):
        f = features(100, 8, seed).double()
        mu = f.mean(0)
        h, r = herding(f, 10), torch.randperm(100, generator=g)[:10]
        for t in range(1, 11):
            herd[t - 1] += float((f[h[:t]].mean(0) - mu).norm())
            rand[t - 1] += float((f[r[:t]].mean(0) - mu).norm())
    assert (herd < rand).all()


def by_hand(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The classifier's input: every child up to `fc`, flattened."""
    model.eval()
    with torch.no_grad():
        return torch.flatten(nn.Sequential(*list(model.children())[:-1])(x), 1)


@pytest.mark.parametrize("model", ["resnet18", "small_resnet"])
def test_penultimate_features_are_the_classifiers_input(model):
    net = resnet18(num_classes=5) if model == "resnet18" else tiny_teacher(5, in_chans=3)
    x = torch.randn(3, 3, 32, 32)
    net.train()
    got = penultimate_features(net, x)
    assert net.training  # mode restored
    assert got.dtype == torch.float32 and got.shape == (3, net.fc.in_features)
    torch.testing.assert_close(got, by_hand(net, x), rtol=0, atol=1e-6)


# The stage, on a tiny synthetic run: 10 classes of ~14 training images, IPC 3.

RUN = {
    **CONFIG,
    "teachers": {"count": 2, "train": {"epochs": 1}},
    "synthesis": {**CONFIG["synthesis"], "ipc": 3},
    "validation": {
        "students": 1,
        "epochs": 1,
        "coresets": ["herding", "k-center"],
        "coreset_teacher": 1,
    },
}


CHUNK = 4


@pytest.fixture(scope="module")
def teachers_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    torch.set_num_threads(1)
    with open_run(root, parse_config(RUN)) as run:
        STAGES["data"](run)
        STAGES["teachers"](run)
    return root


@pytest.fixture(scope="module")
def selected_run(teachers_run, tmp_path_factory):
    """An uninterrupted selection, read in chunks of 4 (several a class, the last partial)."""
    root = tmp_path_factory.mktemp("selected") / "run"
    shutil.copytree(teachers_run, root)
    with open_run(root, parse_config(RUN)) as run:
        urls = select_coresets(run, chunk=CHUNK)
    return root, urls


def stored(root, method):
    rel = images_of(baseline_prefix(method))
    g = zarr.open_group(str(root / rel), mode="r")
    picks = train_indices(RunFS(root), rel)
    return np.asarray(g["images"][:]), torch.from_numpy(np.asarray(g["classes"][:])), picks, g


def test_stores_hold_the_selection_of_directly_computed_features(selected_run):
    root, urls = selected_run
    assert urls == [RunFS(root).url(images_of(baseline_prefix(m))) for m in ("herding", "k-center")]
    assert not has_state(RunFS(root), CHECKPOINT)
    with open_run(root, parse_config(RUN)) as run:
        open_data(run)
        train, _, _ = data_splits(run)
        rows = class_rows(run, train)
        teacher = load_teacher(run, 1)
        done = run.manifest.entries()
    assert not torch.equal(stored(root, "herding")[2], stored(root, "k-center")[2])
    for method, select in (("herding", herding), ("k-center", k_center_greedy)):
        assert images_of(baseline_prefix(method)) in done
        images, classes, picks, g = stored(root, method)
        assert classes.tolist() == list(range(10)) * 3  # the distilled set's class order
        assert len(set(picks.tolist())) == len(picks) == 30
        assert g.attrs["selection"] == method and g.attrs["teacher"] == 1
        for row, i in enumerate(picks.tolist()):
            x, y = train[i]
            assert y == classes[row] and np.array_equal(images[row], x.numpy())
        for c in range(10):
            idx = rows.of(c)
            x = torch.stack([train[i][0] for i in idx.tolist()])
            f = penultimate_features(teacher, x)
            assert g.attrs["feature_dim"] == f.shape[1]
            assert picks[classes == c].tolist() == idx[select(f, 3)].tolist()


def test_a_finished_selection_is_verified_and_kept(selected_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(selected_run[0], root)
    calls = []
    with open_run(root, parse_config(RUN)) as run:
        urls = select_coresets(run, lambda *a: calls.append(a))
    assert urls == [u.replace(str(selected_run[0]), str(root)) for u in selected_run[1]]
    assert calls == []  # no pass over the data


class Killed(Exception):
    pass


def test_a_killed_pass_resumes_at_the_next_class_and_ends_as_an_uninterrupted_one(
    teachers_run, selected_run, tmp_path
):
    root = tmp_path / "run"
    shutil.copytree(teachers_run, root)

    def kill_after_class_3(stage, fraction, info):
        if info["class"].done == 3:
            raise Killed

    with open_run(root, parse_config(RUN)) as run, pytest.raises(Killed):
        select_coresets(run, kill_after_class_3, chunk=CHUNK, checkpoint_classes=1)
    assert has_state(RunFS(root), CHECKPOINT)
    seen = []
    with open_run(root, parse_config(RUN)) as run:
        assert not run.manifest.is_recorded(images_of(baseline_prefix("herding")))
        select_coresets(run, lambda s, f, info: seen.append(info["class"].done), chunk=CHUNK)
    assert seen == list(range(3, 11))  # resumed after class 3 of 10
    assert not has_state(RunFS(root), CHECKPOINT)
    for method in ("herding", "k-center"):
        assert torch.equal(stored(root, method)[2], stored(selected_run[0], method)[2])
        assert np.array_equal(stored(root, method)[0], stored(selected_run[0], method)[0])


def test_a_class_with_fewer_images_than_ipc_is_named(tmp_path):
    cfg = parse_config({**RUN, "synthesis": {**RUN["synthesis"], "ipc": 40, "batch_size": 40}})
    with open_run(tmp_path, cfg) as run:
        open_data(run)
        with pytest.raises(ValueError, match=r"class 0 has \d+ .* 40"):
            select_coresets(run)
