"""Crash safety of `tokenize`: a child process is SIGKILLed at several points, then the run resumes.

Whatever the kill point, the unfinished store is refused by the reader and by verify, and
the resumed store equals an uninterrupted run exactly (no document duplicated or dropped).
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from storage_utils import read_store, tokenize

from cocomix.core.errors import IntegrityError
from cocomix.storage.token_store import TokenStore
from cocomix.storage.verify import verify_token_store

CHILD = r"""
import os, signal, sys
from cocomix.storage import store_writer, tokenize as tk
from cocomix.storage.config import TokenizeConfig

mode, n_kill = sys.argv[1], int(sys.argv[2])
tk.COMMIT_SECONDS = 0.0
calls = [0]

def die_on(n):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

W = store_writer.StoreWriter
if mode == "after-flush":
    flush = W.flush
    def patched(self, final=False):
        flush(self, final)
        die_on(n_kill)
    W.flush = patched
elif mode == "mid-write":
    write = W._write_tokens
    def patched(self, arr, buf, block):
        if len(block) and calls[0] + 1 == n_kill:
            arr.resize((buf.n_tokens + len(block),))
            arr[buf.n_tokens:buf.n_tokens + len(block) // 2] = block[: len(block) // 2]
        if len(block):
            die_on(n_kill)
        write(self, arr, buf, block)
    W._write_tokens = patched
elif mode == "before-progress":
    atomic = store_writer.atomic_write_json
    def patched(path, obj):
        die_on(n_kill)
        atomic(path, obj)
    store_writer.atomic_write_json = patched
elif mode == "before-complete":
    finish = W.finish
    def patched(self, attrs):
        self.commit()
        os.kill(os.getpid(), signal.SIGKILL)
    W.finish = patched
tk.run_tokenize(TokenizeConfig(corpus=sys.argv[3], tokenizer=sys.argv[4], out=sys.argv[5],
                               val_fraction=0.2, chunk_tokens=64, shard_tokens=int(sys.argv[6]), batch_size=4))
print("CHILD FINISHED")
"""

SETTINGS = dict(val_fraction=0.2, chunk_tokens=64, batch_size=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_dir, tokenizer_dir):
    out = tmp_path_factory.mktemp("ref") / "s"
    tokenize(corpus_dir, tokenizer_dir, out, shard_tokens=0, **SETTINGS)
    return read_store(out)


@pytest.mark.parametrize("mode,n_kill,shard_tokens", [
    ("after-flush", 5, 256), ("after-flush", 5, 0), ("mid-write", 3, 256), ("before-progress", 4, 256), ("before-complete", 0, 0),
])
def test_killed_run_is_refused_then_resumes_exactly(tmp_path, corpus_dir, tokenizer_dir, uninterrupted, mode, n_kill, shard_tokens):
    out = tmp_path / "s"
    args = [mode, str(n_kill), str(corpus_dir), str(tokenizer_dir), str(out), str(shard_tokens)]
    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stdout + child.stderr
    assert "CHILD FINISHED" not in child.stdout
    with pytest.raises(IntegrityError, match="incomplete"):
        TokenStore.open(out)
    with pytest.raises(IntegrityError, match="incomplete"):
        verify_token_store(out)
    result = tokenize(corpus_dir, tokenizer_dir, out, shard_tokens=shard_tokens, **SETTINGS)
    assert not result.already_complete
    if mode != "mid-write":
        assert result.resumed_after_docs > 0
    resumed = read_store(out)
    for split in ("train", "val"):
        np.testing.assert_array_equal(resumed[split][0], uninterrupted[split][0])
        np.testing.assert_array_equal(resumed[split][1], uninterrupted[split][1])
    verify_token_store(out)
    assert not list(out.rglob("*.partial"))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_ctrl_c_commits_what_was_tokenized_then_resumes_to_the_same_store(tmp_path, tokenizer_dir, num_proc):
    """SIGINT is taken between batches: the documents tokenized so far are committed (long before
    the periodic save), the CLI says how to continue, and a re-run completes the identical store."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cocomix.storage.store_writer import read_progress

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3000):
        (corpus / f"doc{i:05d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "cocomix.pipeline.cli", "tokenize", "--corpus", str(corpus), "--tokenizer",
           str(tokenizer_dir), "--out", str(out), "--batch-size", "5", "--num-proc", str(num_proc),
           "--val-fraction", "0.1"]
    env = {**os.environ, "COCOMIX_PROGRESS_EVERY": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # plain progress lines: wait until documents are flowing
        if line.startswith("tokenize ") and "/3,000 docs" in line and not line.startswith("tokenize  0/"):
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "interrupted" in output and "re-run the same command" in output
    done = read_progress(out)["docs_done"]
    assert 0 < done < 3000, (done, output)  # committed at the interrupt, well before the 30 s periodic save
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    tokenize(corpus, tokenizer_dir, tmp_path / "ref", batch_size=5)
    got, want = read_store(out), read_store(tmp_path / "ref")
    assert got.keys() == want.keys()
    for split in want:
        for a, b in zip(got[split], want[split]):
            np.testing.assert_array_equal(a, b)
