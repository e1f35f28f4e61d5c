"""Class names of a saved model (classes.json beside it)."""


def test_class_names_cover_a_model_with_more_outputs_than_the_data_has_classes(tmp_path):
    """A server left at 10 classes with 2-class clients: the data's names, then 'unused'."""
    import json

    from pollen.inference.metadata import class_names_for

    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    names = class_names_for(tmp_path / "model.keras", 4)
    assert names == ["a", "b", "unused 2", "unused 3"]
    assert class_names_for(tmp_path / "model.keras", 2) == ["a", "b"]
