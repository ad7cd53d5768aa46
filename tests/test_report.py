"""What the report and the last line of `llkd run` say the student buys."""

from llkd_ray.report import buys_line


def test_the_student_is_put_next_to_its_teacher():
    buys = {
        "student_parameters": 22_700_000,
        "student_megabytes": 87.0,
        "student_texts_per_second": 400.0,
        "teacher_megabytes": 1044.0,
        "teacher_texts_per_second": 16.0,
        "labeling_seconds": 300.0,
    }
    assert buys_line(buys) == (
        "what the student buys: student 87 MB (12x smaller than the teacher); 400 texts/s against the teacher's"
        " 16.0 (25x) on this machine; labeling cost 5.0 min of teacher time"
    )
    resumed = buys | {"teacher_texts_per_second": None, "labeling_seconds": None, "teacher_megabytes": None}
    assert buys_line(resumed) == "what the student buys: student 87 MB; 400 texts/s on this machine"


def test_the_teachers_size_is_read_only_where_its_weights_already_are(tmp_path, monkeypatch):
    from llkd_ray.model_sources import local_weights_megabytes

    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 2**20 * 3)
    assert local_weights_megabytes(str(model)) == 3.0
    # A hub id is neither downloaded nor looked up: a cluster's driver need not hold a 70B teacher.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert local_weights_megabytes("meta-llama/Llama-3.3-70B-Instruct") is None
    assert local_weights_megabytes(str(tmp_path / "not-there")) is None
