"""CSV validation: every problem reported at once, one line each, naming the file and the row."""

from pathlib import Path

import pytest
from PIL import Image

from mmcore.data.csvs import load_splits, read_split
from mmcore.data.split import parse_label
from mmcore.errors import DataError


def write(path, text):
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    return tmp_path


def problems(*args, **kwargs):
    with pytest.raises(DataError) as info:
        read_split(*args, **kwargs)
    return info.value.problems


@pytest.mark.parametrize("value,expected", [("True", 1), ("false", 0), ("1", 1), ("0", 0), (" TRUE ", 1), ("yes", None), ("", None)])
def test_labels(value, expected):
    assert parse_label(value) == expected


def test_reads_rows_resolving_relative_paths_and_empty_text(images):
    csv = write(images / "s.csv", "local_image_path,label,text_info\na.jpg,True,50% off\nb.jpg,0,\n")
    split = read_split(csv, images)
    assert split.paths == (images / "a.jpg", images / "b.jpg")
    assert split.labels == (1, 0) and split.texts == ("50% off", "") and split.rows == (1, 2)


def test_missing_file_and_missing_columns(tmp_path):
    assert problems(tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: file not found"]
    csv = write(tmp_path / "c.csv", "path,label\nx.jpg,True\n")
    assert problems(csv) == [
        f"{csv}: missing column 'local_image_path' (found: path, label)",
        f"{csv}: missing column 'text_info' (found: path, label)",
    ]


def test_bad_labels_and_missing_images_all_at_once(images):
    csv = write(images / "s.csv", "local_image_path,label,text_info\na.jpg,maybe,x\ngone.jpg,True,y\nb.jpg,False,\n")
    assert problems(csv, images) == [
        f"{csv}: row 1: bad label 'maybe' (expected True/False, 1/0 or true/false)",
        f"{csv}: row 2: image not found: {images / 'gone.jpg'}",
    ]


def test_first_ten_and_a_count(images):
    rows = "".join(f"missing{i}.jpg,True,\n" for i in range(25))
    csv = write(images / "s.csv", "local_image_path,label,text_info\n" + rows)
    found = problems(csv, images)
    assert len(found) == 11
    assert found[0] == f"{csv}: row 1: image not found: {images / 'missing0.jpg'}"
    assert found[-1] == f"{csv}: ... and 15 more missing images"


def test_all_splits_are_validated_together(images):
    from mmcore.recipe import DataConfig

    write(images / "train.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,nope,\n")
    write(images / "val.csv", "local_image_path,label\na.jpg,True\n")
    write(images / "test.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,False,\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(base_dir=str(images)))
    assert info.value.problems == [
        f"{images / 'train.csv'}: row 2: bad label 'nope' (expected True/False, 1/0 or true/false)",
        f"{images / 'val.csv'}: missing column 'text_info' (found: local_image_path, label)",
    ]


def test_one_class_in_train_is_refused(images):
    from mmcore.recipe import DataConfig

    for split in ("train", "val", "test"):
        write(images / f"{split}.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,True,\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(base_dir=str(images)))
    assert str(info.value) == f"{images / 'train.csv'}: train split has only one class (True); AUROC and training need both"


def test_run_reports_data_problems_before_training(cli, recipe_file, images):
    write(images / "train.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,perhaps,\n")
    write(images / "val.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,False,\n")
    write(images / "test.csv", "local_image_path,label,text_info\na.jpg,True,\nmissing.jpg,False,\n")
    recipe = recipe_file(
        f'[data]\nbase_dir = "{images}"\n[vision]\nname = "fake_cnn"\n[text]\nname = "fake_text"\n'
        '[pooling]\nname = "mean"\n'
    )
    result = cli("run", recipe, "--out", images / "run", check=False)
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"{images / 'train.csv'}: row 2: bad label 'perhaps' (expected True/False, 1/0 or true/false)",
        f"{images / 'test.csv'}: row 2: image not found: {images / 'missing.jpg'}",
    ]
    assert not (images / "run").exists()  # nothing started, nothing half-written


# ---------------------------------------------------------------- the one CSV reader: dialects

HEADER = "local_image_path,label,text_info\n"


@pytest.mark.parametrize(
    "delimiter,named", [(";", "';'"), ("\t", "a tab"), ("|", "'|'")], ids=["semicolon", "tab", "pipe"]
)
def test_another_delimiter_is_named_in_one_line(images, monkeypatch, delimiter, named):
    monkeypatch.chdir(images.parent)
    (images / "data").mkdir()
    rows = HEADER + "a.jpg,True,buy 1, get 1\n"
    write(images / "data" / "train.csv", rows.replace(",", delimiter))
    assert problems(Path(images.name) / "data" / "train.csv") == [
        f"{Path(images.name) / 'data' / 'train.csv'}: the delimiter is {named}, not ','; save it as a comma-separated CSV"
    ]


def test_a_headerless_semicolon_file_is_named_too(images):
    csv = write(images / "s.csv", "a.jpg;True;sale\nb.jpg;False;\n")
    assert problems(csv) == [f"{csv}: the delimiter is ';', not ','; save it as a comma-separated CSV"]


def test_semicolons_and_tabs_inside_a_comma_csv_are_text(images):
    csv = write(images / "s.csv", HEADER + 'a.jpg,True,"a;b\tc|d"\nb.jpg,False,x;y\n')
    assert read_split(csv).texts == ("a;b c|d", "x;y")


@pytest.mark.parametrize(
    "encoding,name",
    [
        ("utf-16", "UTF-16 (Excel's 'Unicode Text')"),
        ("utf-16-le", "UTF-16 (Excel's 'Unicode Text')"),
        ("utf-16-be", "UTF-16 (Excel's 'Unicode Text')"),
        ("utf-32", "UTF-32"),
        ("utf-32-le", "UTF-32"),
        ("utf-32-be", "UTF-32"),
    ],
)
def test_utf16_and_utf32_with_or_without_bom_are_named(images, encoding, name):
    csv = images / "s.csv"
    csv.write_bytes((HEADER + "a.jpg,True,오늘만 특가 세일\n" * 20).encode(encoding))
    assert problems(csv) == [f"{csv}: not UTF-8 text: it is {name}; re-save it as UTF-8 (Excel: CSV UTF-8)"]


def test_a_bad_byte_after_a_bom_is_at_its_offset_in_the_file(images):
    csv = images / "s.csv"
    prefix = (HEADER + "a.jpg,True,sale\nb.jpg,False,").encode()
    csv.write_bytes(b"\xef\xbb\xbf" + prefix + "오늘만 특가\n".encode("cp949"))
    offset = 3 + len(prefix)
    assert csv.read_bytes()[offset] == "오".encode("cp949")[0]
    assert problems(csv) == [
        f"{csv}: line 3: not UTF-8 text (byte 0x{'오'.encode('cp949')[0]:02x} at offset {offset}); "
        "it looks like CP949/EUC-KR (Korean Windows/Excel); re-save it as UTF-8 (Excel: CSV UTF-8) or convert it: "
        f"iconv -f CP949 -t UTF-8 {csv} > {csv.with_name('s.utf8.csv')}"
    ]


def test_read_table_keeps_every_column_and_checks_only_the_required(images):
    from mmcore.data.csvs import read_table

    csv = write(images / "s.csv", " id ,local_image_path,source\n7,a.jpg,web\n")
    frame = read_table(csv, required=("local_image_path",), optional=("label", "text_info"))
    assert list(frame.columns) == ["id", "local_image_path", "source"]
    assert frame.to_dict("records") == [{"id": "7", "local_image_path": "a.jpg", "source": "web"}]
    with pytest.raises(DataError) as info:
        read_table(csv, required=("local_image_path", "label"))
    assert info.value.problems == [f"{csv}: missing column 'label' (found: id, local_image_path, source)"]


#: ad texts as they are written in each language (three rows each)
EAST_ASIAN_TEXTS = {
    "japanese": ["本日限定セール！全品50%オフ、送料無料でお届けします", "新商品のご案内：今だけポイント10倍",
                 "会員登録で500円クーポンをプレゼント"],
    "korean": ["오늘만 특가 세일 전 품목 50% 할인 무료 배송 ㅋㅋ", "신상품 출시 기념 이벤트 진행 중", "회원 가입하고 特價 쿠폰 받으세요"],
    "simplified": ["限时特价，全场五折，包邮到家，欢迎选购", "新品上市，会员专享优惠券", "注册即送五百元红包"],
    "traditional": ["限時特價，全場五折，免運費到府，歡迎選購", "新品上市，會員專享優惠券", "註冊即送五百元紅包"],
}


@pytest.mark.parametrize(
    "language,encoding,label,iconv",
    [
        ("japanese", "cp932", "Shift-JIS/CP932 (Japanese Windows/Excel)", "CP932"),
        ("japanese", "shift_jis", "Shift-JIS/CP932 (Japanese Windows/Excel)", "CP932"),
        ("japanese", "euc_jp", "EUC-JP (Japanese)", "EUC-JP"),
        ("korean", "cp949", "CP949/EUC-KR (Korean Windows/Excel)", "CP949"),
        ("korean", "euc_kr", "CP949/EUC-KR (Korean Windows/Excel)", "CP949"),
        ("simplified", "gb18030", "GB18030/GBK (Simplified Chinese Windows/Excel)", "GB18030"),
        ("simplified", "gbk", "GB18030/GBK (Simplified Chinese Windows/Excel)", "GB18030"),
        ("traditional", "big5", "Big5/CP950 (Traditional Chinese Windows/Excel)", "CP950"),
        ("traditional", "cp950", "Big5/CP950 (Traditional Chinese Windows/Excel)", "CP950"),
    ],
)
def test_an_east_asian_code_page_is_named_with_the_command_that_converts_it(images, language, encoding, label, iconv):
    """Shift-JIS was named CP949 (it decodes without error as Korean): the code page named is the one whose
    letters are the language's common ones, and converting with the iconv command given reads as UTF-8."""
    import subprocess

    prefix = "local_image_path,label,text_info\na.jpg,True,sale\n"
    body = "".join(f"{name},False,{text}\n" for name, text in zip(("a.jpg", "b.jpg", "a.jpg"), EAST_ASIAN_TEXTS[language]))
    csv = images / "s.csv"
    csv.write_bytes((prefix + body).encode(encoding))
    offset = len(prefix.encode()) + len("a.jpg,False,".encode())
    converted = images / "s.utf8.csv"
    assert problems(csv, images) == [
        f"{csv}: line 3: not UTF-8 text (byte 0x{csv.read_bytes()[offset]:02x} at offset {offset}); it looks like "
        f"{label}; re-save it as UTF-8 (Excel: CSV UTF-8) or convert it: iconv -f {iconv} -t UTF-8 {csv} > {converted}"
    ]
    iconv_binary = subprocess.run(["sh", "-c", "command -v iconv"], capture_output=True, text=True).stdout.strip()
    if iconv_binary:
        subprocess.run(["sh", "-c", f"iconv -f {iconv} -t UTF-8 {csv} > {converted}"], check=True)
        assert read_split(converted, images).texts[1:] == tuple(EAST_ASIAN_TEXTS[language])


def test_a_western_code_page_is_still_named(images):
    csv = images / "s.csv"
    csv.write_bytes("local_image_path,label,text_info\na.jpg,True,Soldes d'été : -50 %\n".encode("cp1252"))
    offset = len("local_image_path,label,text_info\na.jpg,True,Soldes d'".encode())
    assert problems(csv, images) == [
        f"{csv}: line 2: not UTF-8 text (byte 0xe9 at offset {offset}); it looks like Windows-1252 (Western European); "
        f"re-save it as UTF-8 (Excel: CSV UTF-8) or convert it: iconv -f CP1252 -t UTF-8 {csv} > {images / 's.utf8.csv'}"
    ]


# --- rows spread over a split (the export gates' parity rows) -------------------------------------------------


def test_spread_positions_gives_every_label_its_share_in_file_order():
    from mmcore.data.split import spread_positions

    sorted_by_label = [1] * 64 + [0] * 36  # Dredze's val.csv: every spam row first
    picked = spread_positions(100, 20, sorted_by_label)
    assert [sorted_by_label[i] for i in picked].count(0) == 7 and len(picked) == 20  # 36 % of 20, rounded
    assert picked == sorted(set(picked)) and picked[0] < 64 <= picked[-1]
    assert spread_positions(10, 3) == [1, 5, 8]  # no labels: even over the file
    assert spread_positions(5, 9) == [0, 1, 2, 3, 4]
    assert [0, 0, 0, 0, 0, 0, 0, 0, 0, 1][spread_positions(10, 2, [0] * 9 + [1])[-1]] == 1  # a rare label still seen
    for total, count in ((7, 3), (13, 5), (40, 39)):
        labels = [i % 3 for i in range(total)]
        picked = spread_positions(total, count, labels)
        assert len(picked) == count and len(set(picked)) == count and {labels[i] for i in picked} == {0, 1, 2}


def test_the_export_gates_rows_of_a_label_sorted_csv_hold_both_labels(exportable_run, demo_data, tmp_path):
    """The int8 gate measures an AUROC change: the first rows of a split sorted by label gave it one label."""
    import csv

    from mmcore.commands.export import parity_rows
    from mmcore.rundir import RunDir

    with open(Path(demo_data) / "val.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda row: row["label"], reverse=True)
    sorted_csv = tmp_path / "val_sorted.csv"
    with open(sorted_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    positives = sum(1 for row in rows if row["label"] in ("1", "true", "True"))
    assert 8 < positives < len(rows)  # the first 8 rows are all of one label
    picked = parity_rows(RunDir(exportable_run).load_recipe(), sorted_csv, 8, base_dir=Path(demo_data))
    assert len(picked) == 8 and set(picked.labels) == {0, 1}
    assert list(picked.rows) == sorted(picked.rows)  # in file order
