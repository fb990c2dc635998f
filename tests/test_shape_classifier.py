"""The demos' judge: a classifier that is right on held-out synthetic images, and the Frechet distance in a
feature space checked against its closed form."""
import pytest
import torch
import torch.nn as nn

from eval import shape_classifier as sc


class ChannelMeans(nn.Module):
    """A stand-in judge whose features are the per-channel image means (so shifts act on features exactly)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(3, 2)

    def features(self, x):
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """The demos' judge at 16 px (default training set), trained once for this file."""
    path = tmp_path_factory.mktemp("judge")
    sc.load_or_train_classifier(4, 16, path)
    return path


def test_classifier_recognises_held_out_shapes_whatever_their_colour_and_is_cached(judge_dir, monkeypatch):
    judge = sc.load_or_train_classifier(4, 16, judge_dir)
    for class_hues in (True, False):  # the demo's colours, and every shape coloured at random
        images, labels = sc.synthetic_images(4, 16, 400, sc.REFERENCE_SEED, class_hues)
        assert sc.classifier_accuracy(judge, images, labels) >= 0.9
        assert sc.classifier_accuracy(judge, images, labels.roll(1)) < 0.5  # the labels are really compared
    # a second call reads the cache instead of training again
    monkeypatch.setattr(sc, "train_classifier", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = sc.load_or_train_classifier(4, 16, judge_dir)
    x = images[:8]
    assert torch.equal(judge(x), again(x))


def test_a_classifier_of_the_class_coloured_set_reads_only_the_hue():
    """Why the judge trains on random hues: trained on the demo's colours it is near chance on shapes recoloured."""
    colour_reader = sc.train_classifier(4, 16, num_images=1500, epochs=4, class_hues=True)
    images, labels = sc.synthetic_images(4, 16, 400, sc.REFERENCE_SEED, class_hues=False)
    assert sc.classifier_accuracy(colour_reader, images, labels) < 0.5


def test_feature_frechet_distance_closed_form_for_a_shift():
    judge = ChannelMeans()
    torch.manual_seed(0)
    a = torch.randn(500, 3, 4, 4)
    shift = torch.tensor([0.3, -0.2, 0.5])
    b = a + shift[None, :, None, None]  # same covariance, means differ by `shift`: FD = |shift|^2
    assert abs(sc.feature_frechet_distance(judge, a, a)) < 1e-9
    assert abs(sc.feature_frechet_distance(judge, a, b) - shift.pow(2).sum().item()) < 1e-6
    scaled = a * 2  # features scale by 2: FD = |2mu - mu|^2 + Tr(S + 4S - 2 * 2S) = |mu|^2 + Tr(S)
    features = torch.from_numpy(sc.classifier_features(judge, a))
    expected = features.mean(0).pow(2).sum().item() + features.T.cov().trace().item()
    assert abs(sc.feature_frechet_distance(judge, a, scaled) - expected) < 1e-6


def test_judge_samples_accuracy_follows_labels(judge_dir):
    judge = sc.load_or_train_classifier(4, 16, judge_dir)
    images, labels = sc.synthetic_images(4, 16, 300, 7)
    right = sc.judge_samples(judge, images, labels, num_reference=300)
    wrong = sc.judge_samples(judge, images, (labels + 1) % 4, num_reference=300)
    assert right["accuracy"] >= 0.85 and wrong["accuracy"] <= 0.15
    noise = sc.judge_samples(judge, torch.rand_like(images) * 2 - 1, labels, num_reference=300)
    assert noise["fd_synthetic"] > 10 * right["fd_synthetic"]
