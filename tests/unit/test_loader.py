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


def test_a_real_variant_without_weights_says_where_its_family_gets_them():
    """The hint comes from the variant's class (no name parsing): each family names its own official files."""
    import pytest

    from diffcache.backbones import available, check_weights_given, weights_hint

    expect = {"DiT-XL/2": "dl.fbaipublicfiles.com/DiT", "U-ViT-H/2": "baofff/U-ViT",
              "PixArt-XL/2": "PixArt-alpha"}
    for arch, where in expect.items():
        assert arch in available()
        with pytest.raises(ValueError, match="needs its pretrained weights") as e:
            check_weights_given(arch, None, random_init=False)
        assert where in str(e.value) and where in weights_hint(arch)
        check_weights_given(arch, "some.pt", random_init=False)  # given: nothing to say
        check_weights_given(arch, None, random_init=True)        # benchmarks on random weights: allowed
    check_weights_given("mnist_dit", None, random_init=False)   # demo / test variants may run on random weights
    check_weights_given("tiny_dit", None, random_init=False)
    assert "assets/" in weights_hint("mnist_uvit") and weights_hint("tiny_dit") == "" and weights_hint(None) == ""
