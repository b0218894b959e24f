"""The numbers that bound working memory, shared by the plan's estimate and the run that keeps it.

Memory must not grow with the number of checkpoints or the model size: large
tensors are summed in chunks of a fixed size, a fixed number of buffers of each
kind may be in flight between the engine and the writer thread, and writes past
the page cache go through a fixed number of staging buffers.
"""

# Elements per chunk of a large tensor: working memory is a few chunks, whatever the model size.
CHUNK_ELEMENTS = 2**20  # 4 MB of fp32: the accumulator and its scratch stay in the CPU's cache
# Buffers of each kind that may be in flight between the engine and the writer thread.
BUFFERS_IN_FLIGHT = 3
# Staging for writes past the page cache (O_DIRECT): a multiple of every block size it aligns to.
STAGING_BYTES = 4 * 2**20
STAGING_BUFFERS = 4
# Bytes per range request of a remote input; each input being read may hold one beyond the read-ahead.
REMOTE_BLOCK_BYTES = 4 * 2**20
# Bytes fetched ahead of the sums from remote inputs, and range requests at a time, unless told.
READ_AHEAD_BYTES = 64 * 2**20
REMOTE_REQUESTS = 8
# Temporaries per element of rounding a float64 chunk to odd float32 before a narrower output dtype.
ROUNDING_BYTES = 26
# Parts of an upload to a URL output: S3 wants 5 MiB or more (but the last) and 10,000 at most;
# the file being uploaded buffers up to two.
UPLOAD_PART_BYTES = 8 * 2**20
UPLOAD_MAX_PARTS = 9000


def upload_part_bytes(file_bytes: int) -> int:
    """The part size of a file's upload: larger for files over 9,000 minimum parts."""
    return max(UPLOAD_PART_BYTES, -(-file_bytes // UPLOAD_MAX_PARTS))
