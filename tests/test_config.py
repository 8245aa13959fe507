import pytest

from raypress.config import load_config
from raypress.errors import RayPressError


def test_shipped_search_spaces_validate():
    from pathlib import Path

    for p in sorted(Path(__file__).resolve().parents[1].glob("search_spaces/*.yaml")):
        cfg = load_config(p)
        assert cfg.target > 0, p


def test_overrides_apply_with_types():
    cfg = load_config(None, ["searcher.generations=3", "target=0.7", "searcher.stages=[[64, 2], [128, 1]]"])
    assert cfg.searcher.generations == 3 and cfg.target == 0.7 and cfg.searcher.stages == [[64, 2], [128, 1]]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model: [unclosed", "not valid YAML"),
        ("modle: smollm2-135m\n", "unknown config key 'modle'"),
        ("searcher:\n  generatons: 3\n", "unknown config key 'searcher.generatons'"),
        ("target: high\n", "'target'"),
        ("family: pruning\n", "unknown family 'pruning'"),
        ("searcher:\n  stages: [[512, 4], [2048, 2]]\n", "exactly 1 survivor"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        ("data: 5\n", "must be a mapping"),
    ],
)
def test_bad_yaml_is_one_clear_line(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(RayPressError) as e:
        load_config(p)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_missing_config_file():
    with pytest.raises(RayPressError, match="not found"):
        load_config("/nonexistent/space.yaml")
