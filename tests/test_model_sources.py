"""A GGUF teacher converts once into a Hugging Face directory: its metadata parsed once, the result the same; a
first run is told apart from one whose teacher is already converted."""

import contextlib

import pytest


@pytest.mark.slow
def test_a_gguf_converts_with_one_metadata_parse_into_the_same_files_as_three_parses(tmp_path, monkeypatch):
    import gguf

    from llkd_ray import model_sources

    gguf_file = model_sources._builtin_gguf("smollm2-135m-instruct")
    parses = []
    original = gguf.GGUFReader

    class CountingReader(original):
        def __init__(self, *args, **kwargs):
            parses.append(args[0] if args else kwargs.get("path"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    monkeypatch.setenv("LLKD_CACHE", str(tmp_path / "shared"))
    shared = model_sources.convert_gguf(gguf_file)
    assert len(parses) == 1  # tokenizer, config and weights from one parse

    parses.clear()  # the reference: transformers as it is, one parse per load
    monkeypatch.setattr(model_sources, "_one_metadata_parse", contextlib.nullcontext)
    monkeypatch.setenv("LLKD_CACHE", str(tmp_path / "separate"))
    separate = model_sources.convert_gguf(gguf_file)
    assert len(parses) == 3
    assert gguf.GGUFReader is CountingReader  # the shared reader was taken down after the conversion

    files = sorted(f.name for f in shared.iterdir() if f.name != "llkd_source.json")
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert files == sorted(f.name for f in separate.iterdir() if f.name != "llkd_source.json")
    for name in files:
        assert (shared / name).read_bytes() == (separate / name).read_bytes(), name


def test_a_first_run_is_told_apart_from_one_whose_teacher_is_already_converted(tmp_path, monkeypatch):
    from llkd_ray import model_sources

    monkeypatch.setenv("LLKD_CACHE", str(tmp_path))
    assert model_sources.converts_on_first_use("smollm2-135m-instruct")
    assert model_sources.converts_on_first_use("gemma-3-270m")  # not even assembled here yet
    assert not model_sources.converts_on_first_use("minilm-l6")  # an HF directory in its package
    assert not model_sources.converts_on_first_use(str(tmp_path))  # a local directory
    gguf_file = model_sources._builtin_gguf("smollm2-135m-instruct")
    converted = model_sources.converted_path(gguf_file)
    converted.mkdir(parents=True)
    assert model_sources.converts_on_first_use("smollm2-135m-instruct")  # a directory without a model is not one
    (converted / "config.json").write_text("{}")
    assert not model_sources.converts_on_first_use("smollm2-135m-instruct")
    assert not model_sources.converts_on_first_use(str(gguf_file))
