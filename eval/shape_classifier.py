"""A judge for the synthetic-shapes demos: a small CNN classifier and the Frechet distance in its feature space.

On the built-in synthetic set, Inception features (trained on ImageNet) say little about 32 px coloured shapes, so
every demo is judged by a classifier trained on the synthetic set itself:
  * (shape) class accuracy: the fraction of class-conditional samples whose intended class the judge recognises;
  * FD-synthetic: the Frechet distance (eval/fid.py's `frechet_distance`, Eq. of Heusel et al. 2017) between the
    Gaussians fitted to the classifier's penultimate features of the samples and of held-out synthetic images.
The judge is colour-blind: it trains on the synthetic scenes with every shape coloured at random
(`class_hues=False`), so it must read the silhouette. Trained on the class-coloured set, the same network reads the
hue alone (chance accuracy on randomly coloured shapes, tests/test_shape_classifier.py) and would pass coloured
blobs. It trains on its own seeds (never the images a demo trains on), in seconds on a CPU, and is cached in the
results folder.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.training_run import save_atomic
from data.synthetic import SyntheticShapes
from eval.fid import feature_statistics, frechet_distance

TRAIN_SEED, REFERENCE_SEED = 101, 102  # the demos' diffusion models train on seed 0


class ShapeClassifier(nn.Module):
    """Three conv stages and a global average pool: 64-d features, then a linear layer to the class logits."""

    def __init__(self, num_classes, width=32):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x):
        """Penultimate features of images x in [-1, 1], (N, 3, H, W) -> (N, 2 * width)."""
        return self.stages(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def synthetic_images(num_classes, image_size, num_images, seed, class_hues=True):
    """(images in [-1, 1] as (N, 3, H, W), labels) of the synthetic set drawn with `seed` (class_hues: see
    SyntheticShapes)."""
    dataset = SyntheticShapes(num_images, image_size, seed=seed, num_classes=num_classes, class_hues=class_hues)
    images, labels = zip(*(dataset[i] for i in range(num_images)))
    return torch.stack(images), torch.tensor(labels)


def train_classifier(num_classes, image_size, num_images=4000, epochs=8, batch_size=128, seed=0, class_hues=False):
    """Train a ShapeClassifier on `num_images` synthetic images of its own seeds (Adam), coloured at random unless
    class_hues; returned in eval mode."""
    torch.manual_seed(seed)
    images, labels = synthetic_images(num_classes, image_size, num_images, TRAIN_SEED + seed, class_hues)
    model = ShapeClassifier(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(num_images, generator=generator).split(batch_size):
            x = images[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # the demos train on flipped images too
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def judge_cache_path(cache_dir, num_classes, image_size, seed=0, num_images=4000):
    """Where load_or_train_classifier keeps the judge of these settings."""
    return os.path.join(cache_dir, f"shape-judge-c{num_classes}-s{image_size}-n{num_images}-seed{seed}.pt")


def load_or_train_classifier(num_classes, image_size, cache_dir, device="cpu", seed=0, num_images=4000):
    """The classifier for (num_classes, image_size), read from cache_dir or trained and written there."""
    path = judge_cache_path(cache_dir, num_classes, image_size, seed, num_images)
    model = ShapeClassifier(num_classes)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    else:
        with torch.random.fork_rng():  # training the judge must not move the caller's random stream
            model = train_classifier(num_classes, image_size, num_images, seed=seed)
        os.makedirs(cache_dir, exist_ok=True)
        save_atomic(model.state_dict(), path)
    return model.to(device)


@torch.no_grad()
def _batched(classifier, fn, images, batch_size=256):
    device = next(classifier.parameters()).device
    return torch.cat([fn(x.to(device).float()).float().cpu() for x in images.split(batch_size)])


def classifier_accuracy(classifier, images, labels):
    """Fraction of images (in [-1, 1]) whose argmax class is the given label."""
    predicted = _batched(classifier, classifier, images).argmax(dim=1)
    return (predicted == torch.as_tensor(labels).cpu()).float().mean().item()


def classifier_features(classifier, images):
    """Penultimate features of images in [-1, 1], as a float64 (N, D) array (the statistics are computed in float64)."""
    return _batched(classifier, classifier.features, images).double().numpy()


def feature_frechet_distance(classifier, images_a, images_b):
    """FD-synthetic: the Frechet distance between Gaussians fitted to the classifier features of the two sets."""
    mu_a, sigma_a = feature_statistics(classifier_features(classifier, images_a))
    mu_b, sigma_b = feature_statistics(classifier_features(classifier, images_b))
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def judge_samples(classifier, samples, labels, num_reference=1000):
    """Class accuracy of class-conditional samples and their FD-synthetic against held-out synthetic images."""
    num_classes, image_size = classifier.head.out_features, samples.shape[-1]
    reference, _ = synthetic_images(num_classes, image_size, num_reference, REFERENCE_SEED)
    return {"accuracy": classifier_accuracy(classifier, samples, labels),
            "fd_synthetic": feature_frechet_distance(classifier, samples, reference)}
