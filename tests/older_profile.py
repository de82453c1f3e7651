"""The reference profile as mmcore wrote it before the one safetensors file: a ``reference_profile/``
folder of ``profile.json`` (the same summary) and one ``.npy`` per array, built here by hand."""

import json

import numpy as np

from mmcore.quality.profile import profile_summary


def write_profile_folder(folder, profile):
    """``folder`` laid out as an older run's ``reference_profile/`` for ``profile``; -> the folder."""
    folder.mkdir(parents=True)
    np.save(folder / "scores.npy", profile.sample_scores.astype(np.float32), allow_pickle=False)
    for modality, values in profile.embeddings.items():
        np.save(folder / f"embeddings_{modality}.npy", values.astype(np.float16), allow_pickle=False)
    (folder / "profile.json").write_text(json.dumps(profile_summary(profile), indent=2) + "\n", encoding="utf-8")
    return folder
