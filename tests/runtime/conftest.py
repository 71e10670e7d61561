"""The owned runtime's tests run under its `ExecutionContext`."""

from tests import contexts

tff_context = contexts.ring_fixture('owned')
