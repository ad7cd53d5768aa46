"""The student's batched prediction: sorted by length for less padding, answered in the caller's order."""

import numpy as np

from llkd_ray.student import load_student, predict_probs


def test_predictions_come_back_in_order_whatever_the_batching():
    network, tokenizer = load_student("minilm-l6", ["positive", "negative", "neutral"], seed=4)
    texts = ["A long, winding and ultimately rewarding film about grief.", "Bad.", "Fine, I guess?", "Wow!", "Meh."]
    one_by_one = np.concatenate([predict_probs(network, tokenizer, [text], 64) for text in texts])
    timings = {}
    batched = predict_probs(network, tokenizer, texts, 64, batch_size=2, timings=timings)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    assert timings["tokenize_s"] > 0 and timings["forward_s"] > 0


def test_the_mean_pooled_head_reads_the_mean_of_the_text_tokens_and_round_trips_through_export(tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from transformers import AutoModel

    from llkd_ray.model_sources import resolve_model
    from llkd_ray.pooled_classifier import MODEL_TYPE
    from llkd_ray.student import export_student, load_exported_student, student_architecture

    names = ["positive", "negative", "neutral"]
    network, tokenizer = load_student("minilm-l6", names, seed=4, pooling="mean")
    network.eval()
    # No pooler left: a parameter that gets no gradient would stall DDP's reduction.
    assert not [name for name, _ in network.named_parameters() if "pooler" in name]
    texts = ["A long, winding and ultimately rewarding film about grief.", "Bad."]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    encoder = AutoModel.from_pretrained(resolve_model("minilm-l6")).eval()
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
        logits = network(**batch).logits
    for row, text in enumerate(texts):  # by hand: the mean over the text's own tokens, padding left out
        length = len(tokenizer(text)["input_ids"])
        pooled = states[row, :length].mean(dim=0)
        torch.testing.assert_close(logits[row], network.classifier(pooled), atol=1e-5, rtol=0)
    # Seeded: another seed draws another head on the same encoder.
    other, _ = load_student("minilm-l6", names, seed=5, pooling="mean")
    assert not torch.equal(other.classifier.weight, network.classifier.weight)

    directory = export_student(network, tokenizer, tmp_path / "student", {}, max_length=64)
    assert json.loads((directory / "config.json").read_text())["model_type"] == MODEL_TYPE
    loaded, loaded_tokenizer = load_exported_student(directory)
    np.testing.assert_allclose(
        predict_probs(loaded, loaded_tokenizer, texts, 64), predict_probs(network, tokenizer, texts, 64), atol=1e-6
    )
    assert loaded.config.id2label == dict(enumerate(names))
    assert student_architecture(loaded.config) == {"model": "bert", "pooling": "mean"}  # the endpoint's metadata
    plain, _ = load_student("minilm-l6", names, pooling="model")
    assert student_architecture(plain.config) == {"model": "bert", "pooling": "model"}
    # Where llkd_ray is not installed, transformers loads it from the code saved next to the weights.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"d = {str(directory)!r}\n"
        "m = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()\n"
        "t = AutoTokenizer.from_pretrained(d)\n"
        f"b = t({texts!r}, padding=True, return_tensors='pt')\n"
        "assert 'llkd_ray' not in sys.modules\n"
        "print(torch.softmax(m(**b).logits, -1).tolist())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = np.asarray(json.loads(done.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(elsewhere, predict_probs(network, tokenizer, texts, 64), atol=1e-6)
    # A budget round scores with the last round's export: it loads under its own head, whatever pooling says.
    again, _ = load_student(str(directory), names, seed=9, pooling="model")
    assert type(again) is type(loaded)
    torch.testing.assert_close(again.classifier.weight, network.classifier.weight, rtol=0, atol=0)


def test_auto_pooling_follows_what_a_sentence_transformers_checkpoint_says(tmp_path):
    import json
    import shutil

    from llkd_ray.model_sources import resolve_model
    from llkd_ray.pooled_classifier import MeanPooledClassifier, checkpoint_pooling

    builtin = resolve_model("minilm-l6")
    assert checkpoint_pooling(builtin) == "mean"  # all-MiniLM-L6-v2 was trained on the mean of its tokens
    network, _ = load_student("minilm-l6", ["a", "b"], pooling="auto")
    assert isinstance(network, MeanPooledClassifier)
    # A copy that says it pools by [CLS] gets the architecture's own head; so does a plain HF checkpoint.
    copy = tmp_path / "cls"
    shutil.copytree(builtin, copy)
    settings = json.loads((copy / "1_Pooling" / "config.json").read_text())
    (copy / "1_Pooling" / "config.json").write_text(
        json.dumps({**settings, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    )
    assert checkpoint_pooling(copy) == "model"
    assert not isinstance(load_student(str(copy), ["a", "b"], pooling="auto")[0], MeanPooledClassifier)
    (copy / "modules.json").unlink()
    assert checkpoint_pooling(copy) == "model"
    # Whatever a checkpoint's files hold, the answer is one of the two heads, never an exception.
    for planted in ("not json", "[1, 2]", '[{"type": "x.Pooling"}]', '[{"type": "x.Pooling", "path": "../.."}]', "{}"):
        (copy / "modules.json").write_text(planted)
        assert checkpoint_pooling(copy) == "model", planted


def test_loading_a_student_never_runs_the_code_its_directory_carries(tmp_path):
    from llkd_ray.student import export_student, load_exported_student

    network, tokenizer = load_student("minilm-l6", ["a", "b"], seed=1, pooling="mean")
    directory = export_student(network, tokenizer, tmp_path / "student", {}, max_length=64)
    marker = tmp_path / "planted-code-ran"
    planted = (directory / "pooled_classifier.py").read_text() + f"\nopen({str(marker)!r}, 'w').close()\n"
    (directory / "pooled_classifier.py").write_text(planted)
    loaded, _ = load_exported_student(directory)  # what evaluation, budget rounds and the Serve replica call
    assert type(loaded).__module__ == "llkd_ray.pooled_classifier"
    assert not marker.exists()
