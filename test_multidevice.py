"""Data-parallel runners on 8 forced CPU devices equal the single-device results.

The device count must be fixed before JAX is imported, so the check runs in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 8, jax.devices()
    from conftest import A, C, D, S, tiny_ranker_config, tiny_retrieval_config
    from runners import (ModelRunner, RecsysInferenceRunner, RecsysRetrievalInferenceRunner,
                         RetrievalModelRunner, create_example_batch, create_example_corpus)
    batch, emb = create_example_batch(8, D, S, 9, A, seed=1)
    single = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()))
    single.initialize()
    multi = RecsysInferenceRunner(ModelRunner(tiny_ranker_config()), data_parallel=True)
    multi.initialize()
    a, b = single.rank(batch, emb), multi.rank(batch, emb)
    assert len(b.scores.sharding.device_set) == 8, b.scores.sharding
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.ranked_indices, a.ranked_indices)
    np.testing.assert_allclose(multi.rank_large(batch, emb, chunk_size=4).scores, a.scores, rtol=1e-5, atol=1e-6)
    try:
        multi.rank(*create_example_batch(3, D, S, 9, A))
        raise SystemExit("B=3 on 8 devices should have raised")
    except ValueError as e:
        assert "multiple of the 8 devices" in str(e), e
    r1 = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()))
    r8 = RecsysRetrievalInferenceRunner(RetrievalModelRunner(tiny_retrieval_config()), data_parallel=True)
    corpus, ids = create_example_corpus(100, D)
    for r in (r1, r8):
        r.initialize()
        r.set_corpus(corpus, ids)
    o1, o8 = r1.retrieve(batch, emb, top_k=10), r8.retrieve(batch, emb, top_k=10)
    np.testing.assert_array_equal(o8.top_k_indices, o1.top_k_indices)
    np.testing.assert_allclose(o8.top_k_scores, o1.top_k_scores, rtol=1e-5, atol=1e-6)
    print("MULTIDEVICE OK")
""")


def test_data_parallel_runners_equal_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=here, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "MULTIDEVICE OK" in proc.stdout, proc.stdout + proc.stderr
