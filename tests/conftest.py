"""Shared test set-up: assertion rewriting for the transcript helpers."""

import pytest

pytest.register_assert_rewrite("transcript")
