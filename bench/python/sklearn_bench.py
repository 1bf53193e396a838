"""scikit-learn baseline for CLINC150 full: TF-IDF (word 1-2 grams + char
2-5 grams) + LinearSVC, trained on train + oos_train, tested on
test + oos_test (the split trainyard's intent-train uses). Prints one JSON
object: fit time (vectorizers + SVM), in-scope accuracy, OOS recall."""

import argparse
import json
import time

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import make_pipeline, make_union
from sklearn.svm import LinearSVC


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/clinc150/data_full.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    d = json.load(open(a.data))
    train = d["train"] + d["oos_train"]
    test = d["test"] + d["oos_test"]
    x_train, y_train = [t for t, _ in train], [l for _, l in train]
    x_test, y_test = [t for t, _ in test], [l for _, l in test]

    model = make_pipeline(
        make_union(
            TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True),
        ),
        LinearSVC(C=1.0),
    )
    t0 = time.perf_counter()
    model.fit(x_train, y_train)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    pred = model.predict(x_test)
    predict_s = time.perf_counter() - t1

    in_scope = [(p, y) for p, y in zip(pred, y_test) if y != "oos"]
    oos = [(p, y) for p, y in zip(pred, y_test) if y == "oos"]
    print(json.dumps({
        "fit_s": fit_s,
        "predict_s": predict_s,
        "wall_s": time.perf_counter() - t_start,
        "train_examples": len(train),
        "test_examples": len(test),
        "accuracy": sum(p == y for p, y in zip(pred, y_test)) / len(y_test),
        "in_scope_accuracy": sum(p == y for p, y in in_scope) / len(in_scope),
        "oos_recall": sum(p == "oos" for p, _ in oos) / len(oos),
    }))


if __name__ == "__main__":
    main()
