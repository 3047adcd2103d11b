"""Data side of the stack: sources, tokenizer, packing, sharding, resumable state, memory tasks.

    tok = build_tokenizer(data_cfg)
    pipe = build_pipeline(data_cfg, tok, segment_size=S, micro_batch_size=B,
                          rank=r, world_size=w, seed=s, split="train")
    batch = pipe.next_batch(num_segments)   # input_ids, attention_mask, labels, sample_ids
    state = pipe.state_dict(); pipe.load_state_dict(state); pipe.stats(); pipe.close()
"""

from training.data.config import DataConfig, MemoryTaskConfig, SourceConfig
from training.data.curriculum import CurriculumConfig, SegmentCurriculum
from training.data.errors import DataSourceError, DataStateError
from training.data.pipeline import build_pipeline
from training.data.babilong_pipeline import BabilongPipeline  # registers data.source babilong
from training.data.text_pipeline import TextPipeline  # registers data.source text
from training.data.tokenization import build_tokenizer

__all__ = ["DataConfig", "MemoryTaskConfig", "SourceConfig", "CurriculumConfig",
           "SegmentCurriculum", "DataSourceError", "DataStateError", "build_pipeline",
           "build_tokenizer", "BabilongPipeline", "TextPipeline"]
