import json

import pytest

from pool_builder.data.datasets import FASHION_MNIST_CLASSES
from pool_builder.errors import PoolBuilderError, UnknownNameError
from pool_builder.data.hierarchy import TaskHierarchy


@pytest.fixture
def fmnist_tasks():
    return TaskHierarchy.default_for("fashion_mnist", FASHION_MNIST_CLASSES)


def test_default_fashion_mnist_hierarchy(fmnist_tasks):
    assert fmnist_tasks.task_names == ("tops", "footwear", "bottoms", "bags")
    assert fmnist_tasks.class_ids("footwear") == (5, 7, 9)
    assert fmnist_tasks.union_class_ids(["footwear", "tops"]) == (0, 2, 4, 5, 6, 7, 9)
    assert fmnist_tasks.task_of_class()[8] == "bags"


def test_query_parsing(fmnist_tasks):
    assert fmnist_tasks.resolve_query("footwear, tops") == ("footwear", "tops")
    assert fmnist_tasks.resolve_query("tops,footwear") == ("footwear", "tops")  # order does not matter
    assert fmnist_tasks.resolve_query(["bags"]) == ("bags",)


@pytest.mark.parametrize("query, message", [
    ("shoes", "unknown task 'shoes'; valid: bags, bottoms, footwear, tops"),
    ("", "no tasks given"),
    (" , ", "no tasks given"),
    ("tops,tops", "duplicate task 'tops'"),
])
def test_bad_queries_name_the_problem(fmnist_tasks, query, message):
    with pytest.raises(PoolBuilderError, match=message.replace("(", r"\(")):
        fmnist_tasks.resolve_query(query)


def test_unknown_class_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        TaskHierarchy.from_mapping({"shoes": ["Boot"]}, FASHION_MNIST_CLASSES)
    assert "unknown class 'Boot'" in str(info.value) and "Ankle boot" in str(info.value)


def test_overlapping_tasks_are_refused():
    with pytest.raises(PoolBuilderError, match="disjoint: class 'Bag' is in both 'a' and 'b'"):
        TaskHierarchy.from_mapping({"a": ["Bag"], "b": ["Bag", "Coat"]}, FASHION_MNIST_CLASSES)


@pytest.mark.parametrize("mapping, message", [
    ({}, "non-empty JSON object"),
    ({"a": []}, "at least one class"),
    ({"a": "Bag"}, r"task 'a' must be a list of class names, got the string 'Bag' \(write \[.Bag.\]\)"),
    ({"a": {"Bag": 1}}, "at least one class"),
    ({"a": ["Bag", 2.5]}, "lists 2.5: class names must be strings"),
    ({"a": [True]}, "lists true: class names must be strings"),
    ({"../x": ["Bag"]}, "invalid task name"),
])
def test_malformed_hierarchies(mapping, message):
    with pytest.raises(PoolBuilderError, match=message):
        TaskHierarchy.from_mapping(mapping, FASHION_MNIST_CLASSES)


def test_class_repeated_inside_one_task_says_so():
    with pytest.raises(PoolBuilderError, match="class 'Bag' is listed twice in task 'mixed_a'"):
        TaskHierarchy.from_mapping({"mixed_a": ["Bag", "Coat", "Bag"]}, FASHION_MNIST_CLASSES)


def test_unknown_class_message_spells_classes():
    with pytest.raises(UnknownNameError, match="valid classes: "):
        TaskHierarchy.from_mapping({"a": ["Boot"]}, FASHION_MNIST_CLASSES)


def test_numeric_class_names_read_as_folder_names(tmp_path):
    path = tmp_path / "h.json"
    path.write_text('{"low": [0, 1], "high": [2, "3"]}')
    h = TaskHierarchy.from_json(path, ["0", "1", "2", "3", "4"])
    assert h.to_json() == {"low": [0, 1], "high": [2, 3]}
    assert h.uncovered() == ("4",)


def test_json_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"shoes": ["Sneaker", "Sandal"], "rest": ["Bag"]}))
    h = TaskHierarchy.from_json(path, FASHION_MNIST_CLASSES)
    assert h.to_json() == {"shoes": [5, 7], "rest": [8]}
    path.write_text("{not json")
    with pytest.raises(PoolBuilderError, match="not valid JSON"):
        TaskHierarchy.from_json(path, FASHION_MNIST_CLASSES)
    with pytest.raises(PoolBuilderError, match="not found"):
        TaskHierarchy.from_json(tmp_path / "missing.json", FASHION_MNIST_CLASSES)


def test_no_default_for_unknown_dataset():
    with pytest.raises(PoolBuilderError, match="pass --hierarchy FILE"):
        TaskHierarchy.default_for("cifar100", ["a", "b"])
