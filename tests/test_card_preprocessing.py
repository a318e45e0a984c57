"""The HU window travels with the weights: the model card's window reaches every bundle with no flag."""

from __future__ import annotations

import copy

import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose, ScaleIntensityRanged
from test_bundle_load import NAMES, TINY_CARD, tiny_bundles

from dagman_components.data import HU_WINDOWS, ct_load_and_normalise, resolve_hu_window
from dagman_components.weights.encoder_io import EncoderSettingError, card_preprocessing
from dagman_components.errors import ConfigValueError

LUNG = [-1024.0, 300.0]
LUNG_CARD = copy.deepcopy(TINY_CARD)
LUNG_CARD["preprocessing"]["hu_window"] = LUNG


def window_of(transforms) -> list[float]:
    """(a_min, a_max) of the one ScaleIntensityRanged in a list or Compose of transforms."""
    items = transforms.transforms if isinstance(transforms, Compose) else transforms
    scales = [t for t in items if isinstance(t, ScaleIntensityRanged)]
    assert len(scales) == 1
    scaler = scales[0].scaler
    return [scaler.a_min, scaler.a_max]


def test_named_windows_and_bad_windows():
    assert resolve_hu_window("lung") == tuple(LUNG) == HU_WINDOWS["lung"]
    assert resolve_hu_window([-175, 250]) == (-175.0, 250.0)
    with pytest.raises(ConfigValueError, match="hu_window: unknown window 'lungs'"):
        resolve_hu_window("lungs")
    with pytest.raises(ConfigValueError, match="low < high"):
        resolve_hu_window([300, -1024])
    assert window_of(ct_load_and_normalise(hu_window="lung")) == LUNG
    assert not [t for t in ct_load_and_normalise(hu_window=None) if isinstance(t, ScaleIntensityRanged)]


def test_card_preprocessing_takes_the_card_and_refuses_a_contradiction(caplog):
    assert card_preprocessing(None) == {"spacing": [2.0, 2.0, 2.0], "hu_window": [-175.0, 250.0]}
    assert card_preprocessing(LUNG_CARD)["hu_window"] == LUNG
    assert card_preprocessing(LUNG_CARD, hu_window="lung")["hu_window"] == LUNG  # the same window, by name
    with pytest.raises(EncoderSettingError, match=r"hu_window=\[-175.0, 250.0\] contradicts .*\[-1024.0, 300.0\]"):
        card_preprocessing(LUNG_CARD, hu_window="soft_tissue")
    with caplog.at_level("INFO"):  # the spacing is the task's choice: kept, and the difference logged
        assert card_preprocessing(LUNG_CARD, spacing=[1, 1, 1])["spacing"] == [1.0, 1.0, 1.0]
    assert "pretrained at [2.0, 2.0, 2.0] mm" in caplog.text


@pytest.fixture(scope="module")
def lung_bundles(tmp_path_factory):
    return tiny_bundles(tmp_path_factory.mktemp("lung"), LUNG_CARD)


def parsed(bundle, *configs, **overrides):
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(bundle), "device": "$torch.device('cpu')", **overrides})
    return parser


def test_a_lung_window_encoder_is_classified_with_the_lung_window(lung_bundles):
    bundle = lung_bundles[NAMES[1]]
    assert window_of(parsed(bundle, "train.yaml").get_parsed_content("preprocessing")) == LUNG
    assert window_of(parsed(bundle, "inference.json").get_parsed_content("preprocessing")) == LUNG
    with pytest.raises(Exception) as err:  # MONAI wraps the error; the cause names the key and both windows
        parsed(bundle, "train.yaml", hu_window="soft_tissue").get_parsed_content("preprocessing")
    assert isinstance(err.value.__cause__, EncoderSettingError)
    assert "hu_window=[-175.0, 250.0] contradicts the window the encoder was pretrained with" in str(err.value.__cause__)


def test_a_lung_window_encoder_is_segmented_with_the_lung_window(lung_bundles):
    bundle = lung_bundles[NAMES[2]]
    assert window_of(parsed(bundle, "train.yaml").get_parsed_content("train#load")) == LUNG
    assert window_of(parsed(bundle, "inference.json").get_parsed_content("preprocessing")) == LUNG


def test_a_lung_window_encoder_clusters_lung_windowed_crops(lung_bundles):
    evaluator = parsed(lung_bundles[NAMES[3]], "inference.json").get_parsed_content("evaluator")
    assert evaluator.dataset.in_hounsfield and evaluator.hu_window == tuple(LUNG)
