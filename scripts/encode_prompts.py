"""Encode prompts with T5 for PixArt (``data=latents`` with text, or evaluation prompts).

PixArt-α uses T5-v1.1-XXL, 120 tokens, padding to max length; we store the last hidden state
(N, 120, 4096) and the attention mask (N, 120). The tokenizer and encoder come from a local
directory (nothing is downloaded).

    python scripts/encode_prompts.py --t5 /ckpt/t5-v1_1-xxl --prompts prompts.txt --out data/prompts.pt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t5", required=True, help="local transformers T5 directory")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-length", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from transformers import AutoTokenizer, T5EncoderModel

    if not Path(args.t5).exists():
        raise SystemExit(f"--t5 {args.t5} does not exist")
    prompts = [p.strip() for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    tok = AutoTokenizer.from_pretrained(args.t5)
    enc = T5EncoderModel.from_pretrained(args.t5).to(args.device).eval()
    ys, masks = [], []
    for i in tqdm(range(0, len(prompts), args.batch_size), desc="T5"):
        t = tok(prompts[i:i + args.batch_size], max_length=args.max_length, padding="max_length", truncation=True,
                return_tensors="pt").to(args.device)
        with torch.no_grad():
            ys.append(enc(t.input_ids, attention_mask=t.attention_mask).last_hidden_state.float().cpu())
        masks.append(t.attention_mask.cpu())
    torch.save({"y": torch.cat(ys), "mask": torch.cat(masks), "prompts": prompts}, args.out)
    print(f"wrote {args.out}: {len(prompts)} prompts")


if __name__ == "__main__":
    main()
