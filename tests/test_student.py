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
