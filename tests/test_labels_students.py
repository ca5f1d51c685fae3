import torch
import torch.nn.functional as F

from d3s_core.augment import apply_crops, draw_crops, quantise_boxes
from d3s_core.labelling import derive_seed, ensemble_logits, epoch_batches, label_epoch
from d3s_core.students import epoch_schedule, evaluate_top1, kd_loss, train_student_epoch
from storage.fs import RunFS
from storage.labels import read_epoch, write_epoch

from .helpers import tiny_teacher


def teachers(n=2):
    return [tiny_teacher(seed=s).eval() for s in range(n)]


def test_epoch_batches_are_a_seeded_permutation():
    a = epoch_batches(23, 5, seed=1, epoch=0)
    assert [len(b) for b in a] == [5, 5, 5, 5, 3]
    assert sorted(torch.cat(a).tolist()) == list(range(23))
    assert all(torch.equal(x, y) for x, y in zip(a, epoch_batches(23, 5, 1, 0), strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(epoch_batches(23, 5, 1, 1)))
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_label_is_mean_of_teacher_logits_on_the_recorded_augmentation():
    ts = teachers(3)
    images = torch.randn(10, 3, 12, 12)
    lab = label_epoch(images, ts, epoch=4, seed=9, batch_size=4)
    assert lab.logits.shape == (10, 4) and lab.boxes.shape == (10, 4)
    assert sorted(lab.image_index.tolist()) == list(range(10))
    # Replay from the recorded parameters alone gives the stored labels exactly.
    x = apply_crops(images[lab.image_index], lab.boxes, lab.flips)
    with torch.no_grad():
        by_hand = sum(t(x) for t in ts) / 3
    assert torch.allclose(lab.logits, by_hand, atol=1e-5)
    assert torch.equal(ensemble_logits(ts, x), ensemble_logits(ts, x))
    # Deterministic per (seed, epoch), independent of the order epochs are labelled in.
    again = label_epoch(images, ts, epoch=4, seed=9, batch_size=4)
    assert torch.equal(again.logits, lab.logits) and torch.equal(again.boxes, lab.boxes)
    # Batches come back in recorded order.
    rows = lab.batches()
    assert [len(r) for r in rows] == [4, 4, 2]
    assert torch.equal(torch.cat(rows), torch.arange(10))


def test_augmentation_replay_is_exact():
    images = torch.randn(6, 3, 16, 16)
    lab = label_epoch(images, teachers(1), epoch=0, seed=0, batch_size=6)
    a = apply_crops(images[lab.image_index], lab.boxes, lab.flips)
    b = apply_crops(images[lab.image_index].clone(), lab.boxes.clone(), lab.flips.clone())
    assert torch.equal(a, b)


def test_labels_are_computed_on_the_stored_box(tmp_path):
    """label_epoch labels draw_crops' boxes moved onto the uint16 grid, the boxes the file
    stores exactly: a replay of the crops read back gives the stored labels bit for bit."""
    ts, images = teachers(2), torch.randn(8, 3, 12, 12)
    lab = label_epoch(images, ts, epoch=2, seed=5, batch_size=8)  # one batch
    drawn, flips = draw_crops(8, torch.Generator().manual_seed(derive_seed(5, 2, 1)))
    assert torch.equal(lab.boxes, quantise_boxes(drawn)) and torch.equal(lab.flips, flips)
    assert not torch.equal(lab.boxes, drawn)  # the grid moved them (by < 1/131070)
    fs = RunFS(tmp_path)
    write_epoch(fs, "e.parquet", lab, "fp32")
    back = read_epoch(fs, "e.parquet", 2)
    assert torch.equal(back.boxes, lab.boxes)
    x = apply_crops(images[back.image_index], back.boxes, back.flips)
    assert torch.equal(ensemble_logits(ts, x), back.logits)


def test_kd_loss_is_t2_kl_teacher_to_student():
    g = torch.Generator().manual_seed(0)
    y, y_hat = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    T = 20.0
    p, q = F.softmax(y / T, 1), F.softmax(y_hat / T, 1)
    by_hand = T * T * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(kd_loss(y_hat, y, T), by_hand, rtol=1e-5)
    assert kd_loss(y, y, T).abs() < 1e-6


def test_epoch_schedule_d7():
    g = torch.Generator().manual_seed(0)
    same = epoch_schedule(5, 5, g)
    assert sorted(same) == [0, 1, 2, 3, 4]
    shorter = epoch_schedule(5, 3, torch.Generator().manual_seed(1))
    assert len(shorter) == 3 and len(set(shorter)) == 3
    first = torch.randperm(5, generator=torch.Generator().manual_seed(1)).tolist()
    assert shorter == first[:3]
    longer = epoch_schedule(5, 12, torch.Generator().manual_seed(2))
    assert len(longer) == 12
    assert sorted(longer[:5]) == sorted(longer[5:10]) == [0, 1, 2, 3, 4]
    assert set(longer[10:]) <= set(range(5))


def test_student_learns_from_ensemble_labels():
    torch.manual_seed(0)
    ts = teachers(2)
    images = torch.randn(32, 3, 12, 12)
    epochs = [
        label_epoch(images, ts, e, seed=3, batch_size=8, scale=(1.0, 1.0), flip=False)
        for e in range(2)
    ]
    student = tiny_teacher(seed=5)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    losses = [train_student_epoch(student, opt, images, epochs[e % 2], 20.0) for e in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    target = epochs[0].logits.argmax(1)[torch.argsort(epochs[0].image_index)]
    assert evaluate_top1(student, images, target) > 0.5


def test_kd_loss_with_zero_mass_classes_is_finite_and_exact():
    """Top-k labels read without their tail carry -inf logits: 0 log 0 = 0, not NaN."""
    from torch.distributions import Categorical, kl_divergence

    teacher = torch.randn(6, 10)
    teacher[:, 5:] = float("-inf")
    student = torch.randn(6, 10, requires_grad=True)
    t = 4.0
    loss = kd_loss(student, teacher, t)
    ref = t * t * kl_divergence(Categorical(logits=teacher / t), Categorical(logits=student / t))
    assert torch.isfinite(loss) and torch.allclose(loss, ref.mean(), rtol=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
