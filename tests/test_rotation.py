"""MetaContrastive's rotation tricks (data/rotation.py): the task augmentation's draws, the rotation itself, one k
for all views of an image inside the training step, and the auxiliary rotation prediction's loss."""
import pytest
import torch
import torch.nn.functional as F

from data.rotation import random_rotations, rotate, step_generator, task_rotations
from main import main, resolve
from tests.conftest import TINY


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_task_rotations_pick_with_probability_p_and_draw_k_uniformly_in_0_to_3(p):
    g = step_generator(0, 0, 0, 0, torch.device("cpu"))
    k = task_rotations(100_000, p, g, torch.device("cpu"))
    counts = torch.bincount(k, minlength=4).double() / len(k)
    # the authors' rule: an image picked with probability p gets k uniform in {0,1,2,3}
    assert counts[0].item() == pytest.approx(1 - p + p / 4, abs=0.01)
    for r in (1, 2, 3):
        assert counts[r].item() == pytest.approx(p / 4, abs=0.01)
    assert (k != 0).double().mean().item() == pytest.approx(3 * p / 4, abs=0.01)


def test_the_steps_draws_depend_on_the_step_alone():
    cpu = torch.device("cpu")
    a = task_rotations(64, 0.5, step_generator(3, 2, 7, 1, cpu), cpu)
    assert torch.equal(a, task_rotations(64, 0.5, step_generator(3, 2, 7, 1, cpu), cpu))
    others = [step_generator(4, 2, 7, 1, cpu), step_generator(3, 3, 7, 1, cpu), step_generator(3, 2, 8, 1, cpu),
              step_generator(3, 2, 7, 0, cpu)]
    assert all(not torch.equal(a, task_rotations(64, 0.5, g, cpu)) for g in others)
    assert random_rotations(10_000, step_generator(0, 0, 0, 0, cpu), cpu).bincount().min() > 2300
    task_rotations(4, 0.5, step_generator(2**32 - 1, 10**4, 10**6, 63, cpu), cpu)  # any --seed: no overflow


def test_rotate_turns_each_image_by_its_own_k_counter_clockwise():
    x = torch.arange(4 * 2 * 3 * 3, dtype=torch.float32).view(4, 2, 3, 3)
    k = torch.tensor([0, 1, 2, 3])
    out = rotate(x, k)
    h = 3
    for n in range(4):  # written from the definition: a quarter turn maps (i, j) to (h-1-j, i)
        expected = x[n].clone()
        for _ in range(int(k[n])):
            turned = torch.empty_like(expected)
            for i in range(h):
                for j in range(h):
                    turned[:, h - 1 - j, i] = expected[:, i, j]
            expected = turned
        assert torch.equal(out[n], expected), n
    assert torch.equal(out[1][0], 18 + torch.tensor([[2., 5., 8.], [1., 4., 7.], [0., 3., 6.]]))  # a worked example
    with pytest.raises(ValueError, match="square"):
        rotate(torch.zeros(1, 3, 4, 5), torch.zeros(1, dtype=torch.long))


class _Recorder(torch.nn.Module):
    """A method that records the views it gets; its loss trains one weight."""

    rot_head = None

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.register_buffer("progress", torch.zeros(()))
        self.seen = []

    def after_step(self, step, total, outputs):
        pass

    def forward(self, views, index):
        self.seen.append([v.clone() for v in views])
        return self.w * sum(v.mean() for v in views), {}, {}


def test_a_training_step_turns_all_views_of_an_image_by_the_same_k():
    from engine.trainer import StepParts, Trainer

    method = _Recorder()
    trainer = Trainer(StepParts(method, method, torch.optim.SGD(method.parameters(), lr=0.1), torch.full((10,), 0.1),
                                torch.device("cpu"), rot_task_p=0.8, seed=5))
    image = torch.randn(32, 3, 8, 8)
    trainer.train_step([image, image.clone(), image.clone()], torch.arange(32), epoch=1, i=4)
    views = method.seen[-1]
    k = task_rotations(32, 0.8, step_generator(5, 1, 4, 0, torch.device("cpu")), torch.device("cpu"))
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])  # one k per image
    assert torch.equal(views[0], rotate(image, k)) and 0 < int((k != 0).sum()) < 32


def test_rotation_prediction_adds_the_weighted_cross_entropy_of_a_linear_head(tmp_path):
    from models import build_method

    cfg, _, _ = resolve(TINY + ["--clr=simclr", "--rot_pred_weight=0.4", "--rot_pred_decay", "--temperature=0.2"])
    torch.manual_seed(0)
    method = build_method(cfg, num_data=100, cifar_stem=True).eval()  # eval: BN by running stats, so both
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]              # forwards below see the same network
    method.step_generator = step_generator(0, 0, 0, 0, torch.device("cpu"))
    method.progress.fill_(0.5)  # halfway: the cosine decay gives half the weight
    loss, logs, _ = method(views, torch.arange(8))
    plain, _ = method.objective(views, torch.arange(8))
    k = random_rotations(16, step_generator(0, 0, 0, 0, torch.device("cpu")), torch.device("cpu"))
    z = method.projector(method.backbone(rotate(torch.cat(views), k)))
    ce = F.cross_entropy(method.rot_head(F.normalize(z, dim=1) / 0.2 ** 0.5), k)
    assert torch.allclose(loss, plain + 0.2 * ce, atol=1e-6)
    assert logs["rot_pred_weight"].item() == pytest.approx(0.2) and logs["rot_pred_loss"].item() == pytest.approx(
        ce.item(), abs=1e-6)


def test_rotation_mistakes_are_one_line(tmp_path, capsys):
    cases = [(["--rot_task_p=1.5"], "error: --rot_task_p must be a probability in [0, 1], got 1.5"),
             (["--rottlr=-1"], "error: --rot_pred_weight must not be negative (0 is off), got -1.0"),
             (["--adpt"], "error: --rot_pred_decay decays --rot_pred_weight, which is off; pass "
                          "--rot_pred_weight"),
             (["--clr=insdis", "--rot_task_p=0.5"], "error: --rot_task_p makes a rotated image a new class, but "
              "InsDis's memory bank keeps one entry per image; use it with --clr simclr, flatclr or byol")]
    for args, message in cases:
        assert main(TINY + args + [f"--log_dir={tmp_path / 'run'}"]) == 2
        assert capsys.readouterr().err.strip() == message
        assert not (tmp_path / "run").exists()
