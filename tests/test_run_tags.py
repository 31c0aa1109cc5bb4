"""byol_ray.run_tags.code_version inside the runtime image: no git checkout there, so the commit, its dirtiness and
the image tag come from what `make image` baked in (Dockerfile: BYOL_RAY_GIT_COMMIT, BYOL_RAY_GIT_DIRTY,
BYOL_RAY_IMAGE)."""
from __future__ import annotations

import pytest

from byol_ray import run_tags
from byol_ray.run_tags import IMAGE_COMMIT_ENV, IMAGE_DIRTY_ENV, IMAGE_ENV, code_version

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def in_image(monkeypatch):
    """As inside the image: the installed package is not in a git checkout."""
    monkeypatch.setattr(run_tags, "git_commit", lambda folder=None: {})
    for var in (IMAGE_COMMIT_ENV, IMAGE_DIRTY_ENV, IMAGE_ENV):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_an_image_built_from_a_clean_tree_records_git_dirty_false(in_image):
    in_image.setenv(IMAGE_COMMIT_ENV, SHA)
    in_image.setenv(IMAGE_DIRTY_ENV, "false")
    in_image.setenv(IMAGE_ENV, "ghcr.io/byol-ray/byol-ray:0123456789ab")
    assert code_version() == {"git_commit": SHA, "git_dirty": "false", "image": "ghcr.io/byol-ray/byol-ray:0123456789ab"}


def test_an_image_built_with_allow_dirty_records_git_dirty_true(in_image):
    in_image.setenv(IMAGE_COMMIT_ENV, SHA)
    in_image.setenv(IMAGE_DIRTY_ENV, "true")
    in_image.setenv(IMAGE_ENV, "ghcr.io/byol-ray/byol-ray:0123456789ab-dirty")
    tags = code_version()
    assert tags["git_dirty"] == "true" and tags["git_commit"] == SHA
    assert tags["image"].endswith("-dirty")


@pytest.mark.parametrize("value, expected", [("TRUE", "true"), ("1", "true"), ("false", "false"), ("", "false")])
def test_the_dirty_flag_is_read_leniently_but_only_true_means_dirty(in_image, value, expected):
    in_image.setenv(IMAGE_COMMIT_ENV, SHA)
    in_image.setenv(IMAGE_DIRTY_ENV, value)
    assert code_version()["git_dirty"] == expected


def test_an_image_from_before_the_dirty_flag_reads_as_clean(in_image):
    in_image.setenv(IMAGE_COMMIT_ENV, SHA)
    assert code_version() == {"git_commit": SHA, "git_dirty": "false"}


def test_a_checkout_wins_over_the_image_variables(monkeypatch):
    monkeypatch.setattr(run_tags, "git_commit", lambda folder=None: {"git_commit": "abc", "git_dirty": "false"})
    monkeypatch.setenv(IMAGE_COMMIT_ENV, SHA)
    monkeypatch.setenv(IMAGE_DIRTY_ENV, "true")
    assert code_version()["git_commit"] == "abc" and code_version()["git_dirty"] == "false"


def test_outside_git_and_outside_the_image_there_is_no_commit(in_image):
    assert code_version() == {}
