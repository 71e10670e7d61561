"""The library's tests run under TFF's own stock execution context."""

from tests import contexts

tff_context = contexts.ring_fixture('tff')
