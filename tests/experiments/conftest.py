"""The binaries' in-process tests run under the `AcceleratedContext`, as the binaries do."""

from tests import contexts

tff_context = contexts.ring_fixture('accelerated')
