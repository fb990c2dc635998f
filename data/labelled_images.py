"""Class-labelled image data by --data for the class-conditional scripts (dtr.py, ant_clustering.py): the synthetic
shapes, an image folder or pre-extracted VAE latents, and their batches on the device (flips, latent posterior
samples, classifier-free-guidance label drops), re-seeded per step so a resumed run is exact."""
import torch

from common.named_models import cfg_label_dropout
from common.training_run import fail, infinite_loader, random_hflip, seed_step
from common.vae import SCALE_FACTOR as SD_SCALE_FACTOR
from data.image_folder import ImageFolder
from data.latents import LatentDataset, sample_latents
from data.synthetic import SyntheticShapes


def create_dataset(data, image_size, num_classes=None, latent=False):
    """Returns (dataset, channels, spatial size, num_classes) for --data synthetic | PATH, --latent DIR."""
    if data == "synthetic" and not latent:
        ds = SyntheticShapes(num_samples=10_000, image_size=image_size, num_classes=num_classes or 4)
        return ds, 3, image_size, ds.num_classes
    try:
        if latent:  # pre-extracted SD-VAE latents (data/extract_latents.py); --image-size does not apply
            ds = LatentDataset(data)
            c, h, _ = ds.latent_shape
            return ds, c, h, ds.num_classes
        ds = ImageFolder(data, image_size)
        return ds, 3, image_size, len(ds.classes)
    except (FileNotFoundError, ValueError) as e:  # a missing / unfinished folder: one line, no traceback
        fail(str(e))


def prepare_batch(batch, device, latent, flip=True, vae_scale=SD_SCALE_FACTOR):
    """Move a batch to the device; latent batches sample the stored VAE posterior (times vae_scale), pixel batches
    get a flip."""
    if latent:
        if not flip:  # keep the unflipped posterior only (the stored flips are the augmentation)
            batch = {k: v for k, v in batch.items() if not k.endswith("_flip")}
        x, y = sample_latents(batch, scale_factor=vae_scale)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    x, y = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (random_hflip(x) if flip else x), y


def fixed_batch(dataset, num_items, device, latent, vae_scale=SD_SCALE_FACTOR):
    """The first num_items items of the data set, unflipped: a fixed batch for analyses (affinity, CKA)."""
    batch = next(infinite_loader(dataset, min(num_items, len(dataset)), 0, 1, 0, 0))
    return prepare_batch(batch, device, latent, flip=False, vae_scale=vae_scale)


def training_batch(loader, model, args, rank, step, device):
    """This step's batch: re-seed (noise, timesteps, flips, label drops depend on (seed, rank, step) alone, so a
    resumed run is exact), fetch, flip, and drop labels for classifier-free guidance (unconditional: all 0)."""
    seed_step(args.seed, rank, step)
    x, y = prepare_batch(next(loader), device, args.latent, vae_scale=getattr(args, "vae_scale", None))
    if args.unconditional:
        return x, torch.zeros_like(y)
    return x, cfg_label_dropout(model, y)
