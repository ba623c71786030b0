"""The classification images' lesions (bmode_sim lesion_model "birads") carry the BI-RADS descriptors
that separate benign from malignant masses, as tendencies with overlap, and the default images are untouched."""

import numpy as np
import pytest
from scipy import ndimage

from ultrasound_ai.core.errors import InputError
from ultrasound_ai.foundation.bmode_sim import check_appearance, simulate_batch, simulate_bmode

N = 24  # masses per class: enough for the medians below to be stable (seeded, so the test is exact anyway)


def _masses(label):
    return [simulate_bmode(np.random.default_rng([77, label, i]), 96, organ="breast", label=label,
                           lesion_model="birads") for i in range(N)]


def _width_over_height(mask):
    rows, cols = np.nonzero(mask)
    return (np.ptp(cols) + 1) / (np.ptp(rows) + 1)


def _irregularity(mask):
    # Perimeter^2 / (4 pi area): 1 for a disc, larger for an irregular or spiculated outline.
    edge = mask & ~ndimage.binary_erosion(mask)
    return edge.sum() ** 2 / (4 * np.pi * mask.sum())


def _posterior_ratio(s):
    # Mean brightness of the band just below the mass over the same depths beside it.
    m = s.mask.astype(bool)
    rows, cols = np.nonzero(m)
    below = slice(rows.max() + 2, min(m.shape[0], rows.max() + 14))
    under = s.image[below, cols.min():cols.max() + 1].mean()
    side = np.r_[0:max(0, cols.min() - 4), min(m.shape[1], cols.max() + 5):m.shape[1]]
    return under / s.image[below][:, side].mean()


def test_birads_masses_differ_in_orientation_margin_and_posterior_features():
    benign, malignant = _masses(0), _masses(1)
    b_shape = np.array([_width_over_height(s.mask) for s in benign])
    m_shape = np.array([_width_over_height(s.mask) for s in malignant])
    assert np.median(b_shape) > 1.3 and np.median(m_shape) < 1.0  # parallel vs taller than wide
    assert (b_shape < 1.1).mean() < 0.2 and (m_shape > 1.1).mean() < 0.4  # tendencies, some overlap
    b_irr = np.array([_irregularity(s.mask) for s in benign])
    m_irr = np.array([_irregularity(s.mask) for s in malignant])
    assert np.median(m_irr) > 1.3 * np.median(b_irr)  # spiculated / angular vs circumscribed
    b_post = np.median([_posterior_ratio(s) for s in benign])
    m_post = np.median([_posterior_ratio(s) for s in malignant])
    assert m_post < 0.9 < b_post  # shadowing vs enhancement or none
    kinds = {s.info["posterior"] for s in malignant} | {s.info["margin"] for s in malignant}
    assert {"shadowing", "none", "spiculated", "angular/microlobulated"} <= kinds  # variability within a class
    assert {s.info["echogenicity"] for s in benign} >= {"hypo", "iso"}


def test_birads_normal_images_hold_no_mass_and_default_images_are_unchanged():
    # Simple cysts are benign findings: the "birads" normal images have no cyst-like blobs (the v1
    # images keep theirs, so the default sets stay bit-identical).
    normal = simulate_batch(3, range(6), 64, labels=[2], appearance={"lesion_model": "birads"})
    assert all(s.mask.sum() == 0 for s in normal)
    a = simulate_bmode(np.random.default_rng(5), 64, organ="breast", label=0)
    b = simulate_bmode(np.random.default_rng(5), 64, organ="breast", label=0, lesion_model="v1")
    assert np.array_equal(a.image, b.image)
    with pytest.raises(InputError, match="lesion_model"):
        check_appearance({"lesion_model": "birads2"})
    with pytest.raises(InputError, match="lesion_model"):
        simulate_bmode(0, 32, lesion_model="v3")
