"""The accelerator's tests run under its `AcceleratedContext`."""

from tests import contexts

tff_context = contexts.ring_fixture('accelerated')
