"""The small search on the bundled model that the tests run and the dashboard check shows: 8 candidates
a generation, 4 generations, 4 search documents, scored in-process; `write_config(folder, **{"dotted.key":
value})` writes it with changes."""

import json

import yaml

SMALL = {
    "name": "small",
    "model": {"name": "tiny", "device": "cpu", "threads": 1},
    "scale": 4,
    "needles": {"documents": 4, "seed": 3},
    "holdout": {"documents": 4, "seed": 99, "haystack": ["docstrings"]},
    "sampler": {
        "seed": 5,
        "evolution": {"population": 8, "parents": 4, "mutations": 2, "crossovers": 2, "generations": 4},
    },
    "workers": {"backend": "local", "count": 1, "candidates_per_forward": 2, "documents_per_forward": 2},
    "baselines": ["none", "yarn", "critical_ntk"],
}


def write_config(tmp_path, **changes):
    config = json.loads(json.dumps(SMALL))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
