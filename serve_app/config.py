"""The one typed configuration of the service.

Everything tunable lives here with its default and bounds. ``serve_config.yaml`` feeds the
builder's arguments and each deployment's ``user_config`` into these models; nothing else in
the code reads environment variables or hard-codes a limit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.errors import InvalidOption

Precision = Literal["auto", "fp32", "fp16", "bf16"]
CompileMode = Literal["auto", "on", "off"]


class _Strict(BaseModel):
    # A misspelt key in serve_config.yaml must fail at deploy time, not be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class WeightsConfig(_Strict):
    """Where weights come from: explicit paths, then a folder, then a verified download."""

    paths: dict[str, Path] = Field(
        default_factory=dict,
        description="Model name (or file name) -> explicit local file; checked first.",
    )
    folder: Path | None = Field(
        default=None, description="A folder of weight files under their official file names."
    )
    cache_dir: Path = Field(
        default=Path("~/.cache/restore-serve/weights"),
        description="Where verified downloads are kept (put it on a shared disk in a cluster).",
    )
    download: bool = Field(default=True, description="Fetch missing weights from the official URLs.")
    download_timeout_s: float = Field(default=60.0, gt=0)
    retry_interval_s: float = Field(default=60.0, gt=0, description="How often a GPU replica retries, "
                                    "in the background, loading a model whose weights it could not have; "
                                    "meanwhile requests for that model are refused at once.")

    def resolved_cache_dir(self) -> Path:
        return self.cache_dir.expanduser()


class UrlConfig(_Strict):
    """How the service fetches URLs users give it (job images, webhooks)."""

    allow: list[str] = Field(default_factory=list, description="Networks (CIDR) fetched although not public, "
                             "e.g. an internal image store; everything else must resolve to public addresses.")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0, description="Longest wait for the next bytes of an answer.")
    max_redirects: int = Field(default=3, ge=0, le=10, description="Redirects followed, each checked as the URL was.")

    @model_validator(mode="after")
    def _networks_parse(self):
        import ipaddress

        for net in self.allow:
            ipaddress.ip_network(net)  # a ValueError names the bad entry
        return self


class JobsConfig(_Strict):
    """Jobs (POST /v1/jobs): a durable queue, job records and results in object storage."""

    broker_url: str | None = Field(default=None, description="Redis URL of the queue; restore-serve "
                                   "starts a private Redis under data_dir and fills this in when it is unset.")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL of the job records "
                                     "(postgresql+psycopg://... on a cluster); default a SQLite file in data_dir.")
    data_dir: Path = Field(default=Path("~/.local/share/restore-serve"), description="The local broker's "
                           "data, the SQLite records and the results folder, on one machine.")
    s3_bucket: str | None = Field(default=None, description="Keep inputs and results in this S3 bucket "
                                  "(presigned result URLs); default the folder data_dir/objects.")
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(default=None, description="An S3-compatible server instead of AWS.")
    s3_region: str | None = None
    retention_s: float = Field(default=24 * 3600, gt=0, description="Records, inputs and results are "
                               "removed this long after the job was created.")
    visibility_timeout_s: float = Field(default=600, gt=0, description="A job taken by a consumer that "
                                        "dies is handed out again after this long; longer than any job runs.")
    max_retries: int = Field(default=3, ge=0, description="Retries of a job that failed for a passing "
                             "reason (a lost replica, overload); errors in the input fail it at once.")
    webhook_secret: str | None = Field(default=None, description="HMAC key webhooks are signed with; "
                                       "default a random one kept in data_dir.")
    webhook_give_up_s: float = Field(default=600, gt=0, description="How long a webhook is retried.")
    video_frames_in_flight: int = Field(default=16, gt=0, le=256, description="A video segment's frames in "
                                        "the graph at once: enough to fill the GPU's batches, bounded memory.")
    video_segment_s: float = Field(default=10.0, gt=0, description="A video is cut at the first clean keyframe "
                                   "this long after the last cut; each segment runs on a CPU replica.")
    video_segments_in_flight: int = Field(default=4, gt=0, le=64, description="A video job's segments "
                                          "restored at once, each decoded and encoded by its own replica.")
    urls: UrlConfig = UrlConfig()

    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser()

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir() / 'jobs.db'}"


Scope = Literal["restore", "jobs", "admin"]


class RateLimitConfig(_Strict):
    """Token buckets of one API key: a key may spend its burst at once, then the sustained rate."""

    requests_per_s: float | None = Field(default=None, gt=0, description="Sustained requests a second "
                                         "(any route but health); none: no limit.")
    request_burst: int = Field(default=20, gt=0, description="Requests a key may make at once after a quiet spell.")
    pixels_per_s: float | None = Field(default=None, gt=0, description="Sustained input pixels a second "
                                       "(width x height of each uploaded picture); none: no limit.")
    pixel_burst: int = Field(default=64_000_000, gt=0, description="Input pixels a key may send at once; "
                             "a larger picture is refused 413 rather than never admitted.")


class ApiKeyConfig(_Strict):
    """One client's key, kept as its hash: ``restore-serve-keys create`` makes both."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$", description="Who holds the key (logs, limits).")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="sha256:<hex> of the key.")
    scopes: list[Scope] = Field(default_factory=lambda: ["restore", "jobs"], min_length=1,
                                description="restore: /v1/restore and /inference; jobs: /v1/jobs; "
                                "admin: /v1/stats.")
    rate_limit: RateLimitConfig | None = Field(default=None, description="This key's limits; default auth.rate_limit.")


class AuthConfig(_Strict):
    """Who may call the HTTP API. Keys come from here, a file and an environment variable, all
    merged; the file and variable are read again when they change, so keys are added and revoked
    without a redeploy. DeploymentHandle calls inside Ray are not checked: whoever reaches Ray
    has the cluster already."""

    keys: list[ApiKeyConfig] = Field(default_factory=list)
    keys_file: Path | None = Field(default=Path("~/.config/restore-serve/api-keys.yaml"), description="A YAML "
                                   "list of keys (``restore-serve-keys fetch`` writes it from AWS Secrets "
                                   "Manager); one that does not exist gives none.")
    keys_env: str | None = Field(default="RESTORE_SERVE_API_KEYS", description="An environment variable "
                                 "holding the same YAML list.")
    required: bool = Field(default=True, description="false: serve without keys although listening beyond "
                           "localhost (behind a proxy that authenticates); with no keys and this true, the "
                      "ingress refuses to listen beyond localhost.")
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig, description="Limits of keys "
                                        "without their own, and of callers on localhost without a key.")

    @model_validator(mode="after")
    def _names_unique(self):
        names = [key.name for key in self.keys]
        if len(names) != len(set(names)):
            raise ValueError("auth.keys: each key needs a name of its own")
        if not self.required and self.keys:
            raise ValueError("auth.required is false and auth.keys are given: choose one")
        return self


class LimitsConfig(_Strict):
    """Bounds checked from the image header, before any pixel is decoded."""

    max_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=16_000_000, gt=0, description="Input width x height.")
    max_output_pixels: int = Field(default=8192 * 8192, gt=0, description="Output width x height (2048x2048 at x4).")
    max_faces: int = Field(default=20, gt=0, description="Faces restored per image; the largest are kept.")
    max_video_bytes: int = Field(default=1024 * 1024 * 1024, gt=0, description="A video job's input file "
                                 "(an upload is also bound by max_bytes' body limit; larger ones come by URL).")
    max_video_s: float = Field(default=600.0, gt=0, description="A video's duration, from its container's header.")
    max_video_frames: int = Field(default=36_000, gt=0, description="A video's frames (10 minutes at 60 fps).")
    max_output_pixels_per_s: int = Field(default=3840 * 2160 * 60, gt=0, description="A video's output width "
                                         "x height x frame rate: what its encode costs a second of video.")


class TileConfig(_Strict):
    """Fixed-shape tiles: every tile of every image has the same shape, so they batch."""

    size: int = Field(default=256, ge=0, description="Tile side in input pixels; 0 runs whole images.")
    pad: int = Field(default=12, ge=0, description="Context pixels at a shared tile edge, discarded.")
    blend: int = Field(default=8, ge=0, description="Pixels over which neighbouring tiles cross-fade.")
    pre_pad: int = Field(default=10, ge=0, description="Reflection pad on the right and bottom, as upstream.")
    batch_size: int = Field(default=8, gt=0, description="Tiles per forward pass.")

    @model_validator(mode="after")
    def _tile_holds_its_margins(self):
        overlap = 2 * self.pad + self.blend
        if self.size and self.size <= 2 * overlap:
            raise ValueError(f"tile size {self.size} must exceed twice the overlap 2*pad+blend = {overlap}")
        return self


class EngineConfig(_Strict):
    """How an engine is built: its device, number format, compiled form and tile shape. These live
    as long as a replica's engines, so the service takes them as builder arguments (changing them
    redeploys replicas, as any new ``args`` do), never as ``user_config``: the CPU replicas cut
    the tiles the GPU replicas were built for, and an engine is compiled once, at start."""

    device: str = Field(default="auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    precision: Precision = Field(default="auto", description="auto: fp16 on CUDA, fp32 on CPU.")
    compile: CompileMode = Field(default="auto", description="torch.compile the upscaler's full tiles "
                                 "and the GFPGAN restorer and face parser; auto: on CUDA only (replayed "
                                 "as CUDA graphs). Kernels are cached beside the weights.")
    tile: TileConfig = TileConfig()


class RuntimeConfig(_Strict):
    """Knobs a running service can change: the deployments' ``user_config``, applied by
    ``reconfigure`` without restarting replicas. One schema for all deployments; each reads
    the part it needs (serve_config.yaml shares one YAML anchor between them)."""

    limits: LimitsConfig = LimitsConfig()
    # Both waits default to none: a wait delays every lone request and measured no better tail
    # under load (docs/performance.md).
    upscaler_batch_wait_s: float = Field(default=0.0, ge=0, le=1, description="How long a tile that "
                                         "finds the upscaler idle waits for others to share its batch; "
                                         "tiles queued behind a batch never wait.")
    face_batch_size: int = Field(default=8, gt=0)
    face_batch_wait_s: float = Field(default=0.0, ge=0, le=1, description="The same for the face "
                                     "replica's detector and restorer batches.")
    request_timeout_s: float = Field(default=120.0, gt=0, description="A request's whole time in the "
                                     "graph, queues included; past it, 504 timeout and its work stops.")
    max_in_flight: int = Field(default=64, gt=0, description="Requests one ingress replica passes into "
                               "the graph at once (bodies already read); beyond it, 503 overloaded at once.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="Longest a client may take to send its "
                                  "request body; a slower one gets 408 body_timeout and its slot back.")
    draining: bool = Field(default=False, description="Ingress only: answer new requests 503 draining "
                           "(and /readyz 503) while finishing those in flight; restore-serve sets it on "
                           "Ctrl-C or SIGTERM, an operator may set it before taking a cluster down.")
    cpu_threads: int = Field(default=2, gt=0, description="Threads per CPU replica for decode, tiles, "
                             "paste-back and encode (OpenCV and numpy release the GIL).")
    gpu_memory_fraction: float | None = Field(
        default=None, gt=0, le=1, description="Cap on a GPU replica's share of its card's memory; "
        "default: its num_gpus, so replicas sharing a card cannot starve each other.")


class AppArgs(EngineConfig):
    """The builder's arguments (the ``args:`` of serve_config.yaml): what the graph is made of and
    how its engines are built, the same for every deployment."""

    weights: WeightsConfig = WeightsConfig()
    jobs: JobsConfig = JobsConfig()
    auth: AuthConfig = AuthConfig()
    upscalers: list[str] = Field(default_factory=lambda: ["RealESRGAN_x4plus"],
                                 description="Real-ESRGAN models the service offers.")
    face_models: list[str] = Field(default_factory=lambda: ["GFPGANv1.4"])
    face_detect_batch_pixels: int = Field(default=4 * 1024 * 1024, gt=0, description="Pixels the face "
                                          "detector takes in one pass (bounds its GPU memory with large "
                                          "photos); also the largest pass that, the first time its shape "
                                          "comes, runs without cuDNN rather than wait for cuDNN's plans.")
    face_detect_graphs: int = Field(default=16, ge=0, description="Batch shapes (picture size and "
                                    "count) whose face detection is replayed from a CUDA graph where "
                                    "the engines compile: the most recently used are kept, and a shape "
                                    "gets its graph when it comes a second time. 0: none.")
    face_detect_graph_pixels: int = Field(default=1024 * 1024, ge=0, description="Largest detector pass "
                                          "(pixels of all its pictures) replayed from a graph; larger ones "
                                          "run plainly, where launches are a small part of the time and a "
                                          "graph would hold their memory besides the plain calls'.")

    def check_offered(self, *, upscaler: str | None = None, face_model: str | None = None) -> None:
        """Refuse (InvalidOption) an upscaler or face model that this service does not offer."""
        if upscaler is not None and upscaler not in self.upscalers:
            raise InvalidOption(f"model must be one of {', '.join(self.upscalers)} or none, not {upscaler!r}")
        if face_model is not None and face_model not in self.face_models:
            raise InvalidOption(f"face_model must be one of {', '.join(self.face_models)}, not {face_model!r}")
