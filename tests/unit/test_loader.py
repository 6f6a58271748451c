"""One teacher loader: the sampling convention (x0 clipping) comes with the variant, whichever path loads it."""
from omegaconf import OmegaConf

from diffcache.backbones import from_config, load_backbone
from diffcache.utils.resolvers import assets_dir, conf_dir


def test_pixel_variants_clip_by_themselves_and_latent_ones_do_not():
    assert load_backbone("mnist_dit").clip_denoised and load_backbone("mnist_uvit").clip_denoised
    assert not load_backbone("tiny_dit").clip_denoised
    assert not load_backbone("mnist_dit", clip_denoised=False).clip_denoised
    assert not load_backbone("mnist_dit").training  # a frozen teacher


def test_config_and_name_load_the_same_teacher():
    cfg = OmegaConf.load(conf_dir() / "backbone" / "mnist_uvit.yaml")
    cfg.ckpt = str(assets_dir() / "mnist_uvit.pth")
    by_config = from_config(cfg)
    by_name = load_backbone("mnist_uvit", ckpt=cfg.ckpt)
    assert by_config.clip_denoised and by_name.clip_denoised
    a, b = by_config.state_dict(), by_name.state_dict()
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
