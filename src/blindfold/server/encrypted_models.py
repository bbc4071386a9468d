"""Models the owner left encrypted on the host's disk (`POST .../load-encrypted`): the server
reads them only from the folder its operator named (`--encrypted-models-dir`), so an uploader
cannot make it open arbitrary host files, and decrypts them inside the TEE with the key the
owner sent over the attested channel, chunk by chunk straight into a sealed memfd (one copy
of the model, as a streamed upload), or into bytes where there is no memfd (Gramine). Raises
domain errors (`server.refusals`)."""

from __future__ import annotations

from pathlib import Path

from blindfold.errors import SealError
from blindfold.sealing import ModelKey, decrypt_model_file, decrypt_model_file_into
from blindfold.server.model_bytes import ModelBytesWriter, ModelData, memfd_available
from blindfold.server.pools import Pool
from blindfold.server.refusals import AccessDenied, InvalidRequest, NotFound


class EncryptedModels:
    def __init__(self, folder: Path | None, loading: Pool) -> None:
        self._folder = folder  # None: the operator did not enable encrypted model files
        self._loading = loading  # decrypting must not queue behind inferences

    def confine(self, requested: Path) -> Path:
        """`requested` resolved inside the folder; refused when it leads out of it (`..`,
        an absolute path, a symbolic link pointing elsewhere)."""
        if self._folder is None:
            raise AccessDenied(
                "this server does not load encrypted model files; its operator can enable it "
                "with --encrypted-models-dir DIR"
            )
        root = self._folder.resolve()
        resolved = (root / requested).resolve()
        if not resolved.is_relative_to(root):
            raise AccessDenied(
                f"{str(requested)!r} is outside the server's encrypted-models folder"
            )
        return resolved

    async def decrypt(self, requested: Path, key: ModelKey, max_bytes: int) -> ModelData:
        """The model, decrypted and checked against the SHA-256 the key file names: a
        sealed memfd (close it) or, without memfd, bytes."""
        path = self.confine(requested)
        try:
            return await self._loading.call(_decrypt, path, key, max_bytes)
        except FileNotFoundError:
            raise NotFound(f"no encrypted model file at {str(path)!r} on the server") from None
        except OSError as exc:
            raise InvalidRequest(f"cannot read {str(path)!r}: {exc.strerror}") from None
        except SealError as exc:
            raise InvalidRequest(f"cannot decrypt {str(path)!r}: {exc}") from None


def _decrypt(path: Path, key: ModelKey, max_bytes: int) -> ModelData:
    if not memfd_available():
        return decrypt_model_file(path, key, max_bytes=max_bytes)
    writer = ModelBytesWriter()
    try:
        decrypt_model_file_into(path, key, writer, max_bytes=max_bytes)
        return writer.finish()
    finally:
        writer.abandon()  # a refused file's plaintext, if any, goes with its memfd
