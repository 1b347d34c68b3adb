"""Shared test fixtures: tiny configs and parameter trees laid out as the release's; and one XLA
compilation cache for the test session."""

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from grok import TransformerConfig, ffn_size
from recsys_model import HashConfig, PhoenixModelConfig
from recsys_retrieval_model import PhoenixRetrievalModelConfig

D, S, C, A = 16, 6, 4, 19  # tiny sizes keep compile times short

# Set by the session that owns the cache directory; xdist workers and subprocesses find it here.
CACHE_VARIABLE = "PHOENIX_TEST_XLA_CACHE"


def pytest_configure(config):
    """Most of the suite's time is XLA compiling programs that other tests, other trainers of the same
    config and the CLI tests' subprocesses compile too: a persistent compilation cache shared by the
    session (its xdist workers, and subprocesses through the environment) compiles each program once.
    The directory is a fresh temporary one, removed when the session ends: no compiled program outlives
    the run or lands in the user's home, and results never depend on an earlier run."""
    if os.environ.get("PHOENIX_TEST_NO_XLA_CACHE"):  # to compare: the suite compiling every program itself
        return
    directory = os.environ.get(CACHE_VARIABLE)
    if directory is None:
        directory = tempfile.mkdtemp(prefix="phoenix-test-xla-cache-")
        config._phoenix_xla_cache = directory  # removed by this process in pytest_unconfigure
    settings = {"JAX_COMPILATION_CACHE_DIR": directory, CACHE_VARIABLE: directory,
                # Every program: most are small and compile in under a second, which adds up.
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    os.environ.update(settings)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    directory = getattr(config, "_phoenix_xla_cache", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def tiny_transformer(**kw) -> TransformerConfig:
    args = dict(emb_size=D, key_size=8, num_q_heads=4, num_kv_heads=2, num_layers=2, widening_factor=2,
                attn_output_multiplier=1 / np.sqrt(8))
    args.update(kw)
    return TransformerConfig(**args)


def tiny_ranker_config(fprop_dtype=np.float32, **kw) -> PhoenixModelConfig:
    return PhoenixModelConfig(model=tiny_transformer(**kw), emb_size=D, num_actions=A, history_seq_len=S,
                              candidate_seq_len=C, fprop_dtype=fprop_dtype, hash_config=HashConfig()).initialize()


def tiny_retrieval_config(fprop_dtype=np.float32, **kw) -> PhoenixRetrievalModelConfig:
    return PhoenixRetrievalModelConfig(model=tiny_transformer(**kw), emb_size=D, history_seq_len=S,
                                       candidate_seq_len=C, fprop_dtype=fprop_dtype,
                                       hash_config=HashConfig()).initialize()


def release_layout(cfg, scope: str, retrieval: bool = False) -> dict:
    """{module path: {name: shape}} exactly as the release lays them out."""
    t = cfg.model
    Dm, F = cfg.emb_size, ffn_size(cfg.emb_size, t.widening_factor)
    hc = cfg.hash_config
    hi, ha = hc.num_item_hashes, hc.num_author_hashes
    layout = {scope: {"action_projection": (A, Dm),
                      "product_surface_embedding_table": (cfg.product_surface_vocab_size, Dm),
                      "proj_mat_1": (hc.num_user_hashes * Dm, Dm),
                      "proj_mat_3": ((hi + ha + 2) * Dm, Dm)}}
    if retrieval:
        layout[f"{scope}/~build_candidate_representation/candidate_tower"] = {
            "candidate_tower_projection_1": ((hi + ha) * Dm, 2 * Dm),
            "candidate_tower_projection_2": (2 * Dm, Dm)}
    else:
        layout[scope].update({"proj_mat_2": ((hi + ha + 1) * Dm, Dm), "unembeddings": (Dm, cfg.num_actions)})
        layout[f"{scope}/rms_norm"] = {"scale": (Dm,)}
    for i in range(t.num_layers):
        pre = f"transformer/decoder_layer_{i}"
        mha = f"{pre}/multi_head_attention"
        layout[f"{mha}/query"] = {"w": (Dm, t.num_q_heads * t.key_size)}
        layout[f"{mha}/key"] = {"w": (Dm, t.num_kv_heads * t.key_size)}
        layout[f"{mha}/value"] = {"w": (Dm, t.num_kv_heads * t.key_size)}
        layout[f"{mha}/linear"] = {"w": (t.num_q_heads * t.key_size, Dm)}
        layout[f"{pre}/linear"] = {"w": (Dm, F)}
        layout[f"{pre}/linear_v"] = {"w": (Dm, F)}
        layout[f"{pre}/linear_1"] = {"w": (F, Dm)}
        for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            layout[f"{pre}/{n}"] = {"scale": (Dm,)}
    return layout


def random_release_params(cfg, scope: str, retrieval: bool = False, seed: int = 0) -> dict:
    """A float32 parameter tree built from the release's layout alone (not from our init)."""
    rng = np.random.default_rng(seed)
    params = {}
    for module, entries in release_layout(cfg, scope, retrieval).items():
        params[module] = {}
        for name, shape in entries.items():
            if name == "scale":
                value = 1.0 + 0.3 * rng.standard_normal(shape)
            else:
                value = rng.standard_normal(shape) / np.sqrt(shape[0])
            params[module][name] = value.astype(np.float32)
    return params


@pytest.fixture(scope="session")
def ranker_cfg():
    return tiny_ranker_config()


@pytest.fixture(scope="session")
def retrieval_cfg():
    return tiny_retrieval_config()
