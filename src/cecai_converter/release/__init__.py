"""Publishing conversion outputs: a GitHub release (draft first, files split below 2 GB, ``SHA256SUMS``, notes,
published last unless a check failed) and a Hugging Face model repo.

One room per concern; callers import from the room that holds a name:

* :mod:`.assets`: the files to publish (:func:`~.assets.collect_assets`, each checked against its manifest) and
  ``SHA256SUMS`` (:data:`~.assets.CHECKSUMS_NAME`);
* :mod:`.split`: GGUF files split in llama.cpp's split format below :data:`~.split.SIZE_LIMIT`;
* :mod:`.manifests`: the manifest as published (no host paths, check records merged) and the checks' verdict;
* :mod:`.notes`: the release notes, within GitHub's limit on a description;
* :mod:`.github`: the REST client (:class:`~.github.GitHubClient`);
* :mod:`.publish`: plan → upload → finalize (:func:`~.publish.publish_release`);
* :mod:`.hub_push`: the Hugging Face push (:func:`~.hub_push.push_to_hub`);
* :mod:`.commands`: the ``publish`` command.
"""
