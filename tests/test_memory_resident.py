"""memory/resident.py: smaps by kind, and dropping clean library code pages (torch still works)."""
import sys

import pytest
import torch

from memlm.memory import resident

SMAPS = """\
00400000-00452000 r-xp 00000000 08:02 173521      /usr/lib/libfoo.so
Rss:                 200 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
Shared_Dirty:          0 kB
00652000-00653000 r--p 00052000 08:02 173521      /usr/lib/libfoo.so
Rss:                   4 kB
Anonymous:             4 kB
Private_Dirty:         4 kB
00653000-00654000 rw-p 00053000 08:02 173521      /usr/lib/libfoo.so
Rss:                   4 kB
Anonymous:             4 kB
00700000-00710000 r-xp 00000000 08:02 173522      /usr/lib/libtextrel.so
Rss:                  64 kB
Anonymous:             8 kB
Private_Dirty:         8 kB
0e4e8000-0e509000 rw-p 00000000 00:00 0           [heap]
Rss:                 132 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                 512 kB
Anonymous:           512 kB
7f1000000000-7f1000200000 r--s 00000000 08:02 99  /models/m.gguf
Rss:                1024 kB
7ffc0000-7ffc2000 rw-p 00000000 00:00 0           [stack]
Rss:                   8 kB
7ffd0000-7ffd2000 r-xp 00000000 00:00 0           [vdso]
Rss:                   4 kB
"""


def test_smaps_kinds_and_which_text_is_clean(tmp_path):
    f = tmp_path / "smaps"
    f.write_text(SMAPS)
    maps = resident.read_mappings(str(f))
    assert [m.kind for m in maps] == ["text", "lib_ro", "lib_rw", "text", "heap", "anon", "file_shared",
                                      "stack", "other"]
    # only the never-written file-backed code: not the copy-on-write text, not [vdso], not data
    assert [m.clean_text for m in maps] == [True] + [False] * 8
    assert (maps[0].start, maps[0].end, maps[0].rss) == (0x400000, 0x452000, 200 * 1024)
    kinds = resident.resident_by_kind(str(f))
    assert kinds == {"text": 264 * 1024, "lib_ro": 4096, "lib_rw": 4096, "file_shared": 1024 * 1024,
                     "heap": 132 * 1024, "anon": 512 * 1024, "stack": 8192, "other": 4096}
    assert resident.resident_by_kind(str(tmp_path / "missing")) == dict.fromkeys(resident.KINDS, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_dropping_text_lowers_rss_and_torch_still_works():
    from engine_fakes import llama_config, tiny_loaded
    from memlm.models.kv import DenseView
    model = tiny_loaded(llama_config()).model
    ids = torch.arange(12) % 200
    a = torch.randn(33, 65, generator=torch.Generator().manual_seed(0))

    def run():
        with torch.inference_mode():
            return a @ a.T, model(ids, torch.arange(12), DenseView(1, 12))
    mm0, h0 = run()
    text0 = resident.resident_by_kind()["text"]
    dropped = resident.drop_text_pages(force=True)
    text1 = resident.resident_by_kind()["text"]
    assert dropped > 4 * 2**20 and text1 < text0 - 4 * 2**20     # torch's code alone is ~60 MiB
    mm1, h1 = run()                                               # the code faults back in
    assert torch.equal(mm0, mm1) and torch.equal(h0, h1)
    assert all(m.anonymous == 0 for m in resident.read_mappings() if m.clean_text)


def test_the_switch_turns_the_drop_off(monkeypatch):
    monkeypatch.setenv("MEMLM_TRIM_TEXT", "0")
    assert not resident.trim_text_enabled() and resident.drop_text_pages() == 0
    monkeypatch.setenv("MEMLM_TRIM_TEXT", "1")
    assert resident.trim_text_enabled()
