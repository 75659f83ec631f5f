"""Train a tiny Keras classifier on a run's log-mels: `python -m examples.train_keras RUN_DIR`.

The README's training example. It uses the run's own split column: `train` to fit, `test` to
report held-out accuracy against chance (1 / number of classes). `--save model.keras` keeps the
classifier and `--save_embedding embedding.keras` its penultimate layer, a `[B, T, n_mels]` log-mel
-> `[B, 32]` encoder that `tf_model` (with `input: logmel`) runs as an embedding extractor on
another dataset.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train(
    run_dir: str, *, epochs: int = 40, seed: int = 0, save: str | None = None, save_embedding: str | None = None
) -> dict:
    """Fit on the run's `train` split and score its `test` split.

    save: path of a `.keras` file for the trained classifier; save_embedding: the same for the
    model cut at its penultimate layer (the 32-wide Dense), for use as an embedding extractor.
    """
    import keras
    import tensorflow as tf

    import export

    keras.utils.set_random_seed(seed)
    classes = json.load(open(os.path.join(run_dir, "features.json")))["labels"]

    def xy(ds):
        return ds.map(lambda x, y: (x["logmel"], y))

    train_ds = xy(export.load_tfrecords(run_dir, features=["logmel"], split="train", batch_size=16, shuffle=256, seed=seed))
    test_ds = xy(export.load_tfrecords(run_dir, features=["logmel"], split="test", batch_size=16))
    n_mels = train_ds.element_spec[0].shape[-1]
    model = keras.Sequential(
        [
            keras.Input(shape=(None, n_mels)),
            keras.layers.Rescaling(1 / 40.0, offset=2.0),  # dB in about [-80, 0] -> [0, 2]
            keras.layers.Conv1D(32, 5, activation="relu", padding="same"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(len(classes), activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=epochs, verbose=0)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    test_items = sum(int(tf.shape(y)[0]) for _, y in test_ds)
    if save:
        model.save(save)
    if save_embedding:
        keras.Model(model.inputs, model.layers[-2].output, name="logmel_embedding").save(save_embedding)
    return {"accuracy": float(accuracy), "chance": 1.0 / len(classes), "classes": classes, "test_items": test_items}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--save", help="write the trained classifier to this .keras file")
    parser.add_argument("--save_embedding", help="write the classifier cut at its penultimate layer to this .keras file")
    args = parser.parse_args()
    result = train(args.run_dir, epochs=args.epochs, save=args.save, save_embedding=args.save_embedding)
    print(f"held-out accuracy {result['accuracy']:.3f} on {result['test_items']} items (chance {result['chance']:.3f})")
    for path in (args.save, args.save_embedding):
        if path:
            print(f"saved {path}")


if __name__ == "__main__":
    main()
