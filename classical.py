"""What a denoiser is measured against, needing no training: two filters from Pillow, OpenCV's
non-local means, and a noise level guessed from a photo alone. dae.py's table, compare.py and
tools/classical_denoisers.py use them; BM3D, whose package may not be used commercially, lives in
that tool alone. Not here: the noise itself and the DAE (dae.py).
"""

import math

import numpy as np
import torch
from PIL import Image
from torch import nn

# OpenCV's NLM strength h over the noise level, both in 0-255 units: the best of 0.3-1.2 on 100
# training photos at gaussian 0.05, 0.1 and 0.2 (python tools/classical_denoisers.py --calibrate-nlm).
NLM_STRENGTH = 0.5


def estimate_noise_level(images):
    """Each image's noise level (B,) guessed from the image alone, for a photo whose clean original
    nobody has (Immerkaer 1996): a 3x3 kernel that cancels any plane of brightness, so what it
    leaves in smooth regions is noise; the mean absolute response, scaled, is the noise's sigma."""
    kernel = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]]).view(1, 1, 3, 3)
    batch, channels, height, width = images.shape
    response = nn.functional.conv2d(images.reshape(batch * channels, 1, height, width).float(), kernel)
    return (response.abs().view(batch, -1).mean(dim=1) * math.sqrt(math.pi / 2) / 6).to(images.dtype)


def pillow_filter(images, image_filter):
    """Apply a Pillow filter to each image of a (B, 3, S, S) tensor."""
    filtered = []
    for image in images:
        pixels = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        filtered.append(np.asarray(Image.fromarray(pixels).filter(image_filter)))
    return torch.from_numpy(np.stack(filtered)).permute(0, 3, 1, 2).float() / 255


def nlm_filter(images, level):
    """OpenCV's non-local means (Buades et al. 2005) on each image (B, 3, S, S), its strength h set in
    proportion to the image's noise level (B,): each pixel becomes a mean of the pixels, near it,
    whose 7x7 patches look like its own."""
    import cv2  # opencv-python-headless: only this table needs it

    filtered = []
    for image, sigma in zip(images, level.tolist()):
        pixels = np.ascontiguousarray((image.permute(1, 2, 0) * 255).round().byte().numpy()[:, :, ::-1])  # BGR
        strength = NLM_STRENGTH * sigma * 255
        filtered.append(cv2.fastNlMeansDenoisingColored(pixels, None, strength, strength, 7, 21)[:, :, ::-1].copy())
    return torch.from_numpy(np.stack(filtered)).permute(0, 3, 1, 2).float() / 255
